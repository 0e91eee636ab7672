#!/usr/bin/env bash
# Install fvlm into a virtual environment: `bash scripts/install.sh [cpu|cuda]`.
#
# cpu (default): a pinned CPU build of torch first, then fvlm with torch held at that
#   version by a pip constraint, so no dependency can swap it for a multi-GB CUDA build.
#   TotalSegmentator -> nnunetv2 -> timm -> torchvision pulls a torchvision built against
#   another torch; its compiled ops then fail to load (`operator torchvision::nms does not
#   exist`), which also breaks `from transformers import BertModel`. fvlm needs neither
#   torchvision nor timm, so a broken pair is removed at the end (TotalSegmentator's own
#   inference on CPU then needs a matching CPU torchvision: see README).
# cuda: torch and torchvision as a matching CUDA pair from PyPI, then fvlm.
#
# Environment: FVLM_VENV (default .venv), TORCH_VERSION (default 2.13.0),
#   TORCHVISION_VERSION (cuda mode, default 0.29.1 with TORCH_VERSION 2.14.1),
#   TORCH_INDEX_URL (cpu mode: e.g. the PyTorch CPU wheel index, where PyPI's torch is CUDA).
set -euo pipefail
mode="${1:-cpu}"
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FVLM_VENV:-$here/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

case "$mode" in
  cpu)
    tv="${TORCH_VERSION:-2.13.0}"
    idx=()
    [ -n "${TORCH_INDEX_URL:-}" ] && idx=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple)
    echo "[install] torch==$tv (CPU)"
    "${pip[@]}" install -q "torch==$tv" "${idx[@]}"
    ;;
  cuda)
    tv="${TORCH_VERSION:-2.14.1}"
    tvv="${TORCHVISION_VERSION:-0.29.1}"
    echo "[install] torch==$tv torchvision==$tvv (CUDA build from PyPI)"
    "${pip[@]}" install -q "torch==$tv" "torchvision==$tvv"
    ;;
  *) echo "usage: scripts/install.sh [cpu|cuda]" >&2; exit 2 ;;
esac

# Hold torch at the installed version while resolving everything else.
installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
echo "torch==$installed" > "$constraints"
echo "[install] fvlm and its dependencies (torch held at $installed)"
"${pip[@]}" install -q -c "$constraints" -e "$here[dev]"
rm -f "$constraints"

if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  if "$venv/bin/python" -m pip show torchvision >/dev/null 2>&1; then
    echo "[install] removing torchvision/timm built for another torch (not used by fvlm)"
    "${pip[@]}" uninstall -q -y torchvision timm
  fi
fi
"$venv/bin/python" -c "from transformers import BertModel; import torch, deepspeed, monai" 2>/dev/null \
  || { echo "[install] the installed stack does not import cleanly" >&2; exit 1; }
if [ "$mode" = cpu ]; then
  # DeepSpeed JIT-compiles its CPU shared-memory collective op the first time a process group starts
  # (about a minute); build it now, into $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
  # so the first `fvlm pretrain` (and the test suite) does not wait for it. Best effort.
  echo "[install] building DeepSpeed's CPU shm op (once; cached in ${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions})"
  "$venv/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
    || echo "[install] (DeepSpeed's shm op did not build now; it is built on first use)"
fi
touch "$venv/.fvlm-installed"
echo "[install] done: $("$venv/bin/fvlm" --version) with torch $installed in $venv"
