#!/usr/bin/env bash
# The project's GPU check (run it where a CUDA GPU is lent; after `bash scripts/install.sh cuda`):
# ViT-B/3D at the fVLM input size (352x256x112, 1232 tokens), bf16, under ZeRO-2 and ZeRO-3,
# 50 steps each on synthetic volumes: samples/s, MFU against 989 TFLOP/s (H100 SXM dense bf16),
# peak GPU memory, and whether the loss falls; then the real sample path on the GPU
# (benchmarks/loader_bench.py --device cuda: shards and model-input cache of the shipped CT, worker
# CPU-s, host-to-device bytes and the device stage's time per sample, cores per H100), under 5 minutes.
# Without CUDA it prints one line and exits 1.
#   bash benchmarks/gpu_check.sh [--steps N] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/pretrain_bench.py --gpu-check --steps 50 --warmup 5 "$@"
timeout 300 "$PY" benchmarks/loader_bench.py --small --cases 4 --batches 3 --device cuda
