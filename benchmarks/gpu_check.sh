#!/usr/bin/env bash
# The project's GPU check (run it where a CUDA GPU is lent; after `bash scripts/install.sh cuda`):
# ViT-B/3D at the fVLM input size (352x256x112, 1232 tokens), bf16, under ZeRO-2 and ZeRO-3,
# 50 steps each on synthetic volumes: samples/s, MFU against 989 TFLOP/s (H100 SXM dense bf16),
# peak GPU memory, and whether the loss falls. Without CUDA it prints one line and exits 1.
#   bash benchmarks/gpu_check.sh [--steps N] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/pretrain_bench.py --gpu-check --steps 50 --warmup 5 "$@"
