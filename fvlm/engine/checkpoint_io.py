"""Reading resumable checkpoints without ever running pickled code.

Everything a resume reads goes through :func:`safe_torch_load` (``torch.load(weights_only=True)``):

* fvlm's own trainer state is ``trainer_state_rank<r>.json`` (step, micro-batch position, best
  metric, Python/NumPy RNG states) beside ``trainer_state_rank<r>.pt`` (the torch/CUDA RNG
  tensors only);
* DeepSpeed's own files (``mp_rank_*_model_states.pt``, ``*_optim_states.pt``) are read by
  DeepSpeed through its checkpoint engine, whose ``load`` :func:`make_engine_safe` replaces with
  the weights-only loader. DeepSpeed 0.19.8 stores three of its own plain classes in the
  optimizer states (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on
  ZeRO 0/2/3 fp32/bf16 checkpoints); only those are allow-listed (:data:`DEEPSPEED_SAFE_GLOBALS`).
  Their unpickling only sets attributes; any other global, e.g. ``os.system`` in a crafted
  file, is refused before anything runs.

:func:`check_files` is the cheap pre-check every rank runs before a resume: each ``.pt`` file of
the tag must open as a zip archive (a truncated file does not) and name no global outside the
allow-list.
"""
from __future__ import annotations

import importlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..torchfile import read_torch_file, refused_pickle
from ..errors import FormatError

__all__ = ["DEEPSPEED_SAFE_GLOBALS", "safe_torch_load", "make_engine_safe", "check_files",
           "write_trainer_state", "read_trainer_state", "rng_state", "set_rng_state"]

#: "module.Class" names DeepSpeed 0.19.8 pickles into its optimizer states
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_classes() -> list:
    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        mod, _, cls = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), cls))
        except (ImportError, AttributeError):   # another DeepSpeed version: that name simply stays refused
            pass
    return out


def safe_torch_load(path: str | os.PathLike, map_location=None, what: str = "checkpoint file") -> Any:
    """:func:`~fvlm.torchfile.read_torch_file` with DeepSpeed's three plain classes allowed."""
    return read_torch_file(path, what, map_location=map_location, safe_globals=_safe_classes())


def make_engine_safe(engine) -> None:
    """Make a ``DeepSpeedEngine`` read its checkpoint files with :func:`safe_torch_load`."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load"):
        raise FormatError("this DeepSpeed version has no checkpoint engine to make weights-only; "
                          "refusing to resume with an unpickling loader")

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location, what="DeepSpeed checkpoint file")

    ce.load = load


def check_files(tag_dir: Path) -> str | None:
    """``None`` if every ``.pt`` file in ``tag_dir`` opens and names only allowed globals, else
    the reason (one line) it cannot be resumed from."""
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        return f"{tag_dir} holds no checkpoint files"
    for f in files:
        try:
            bad = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) - set(DEEPSPEED_SAFE_GLOBALS)
        except Exception as e:  # noqa: BLE001 - zip errors of a truncated file, permission errors, ...
            return f"{f} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated?'})"
        if bad:
            return f"{f}: {refused_pickle(', '.join(sorted(bad)))}"
    return None


# --------------------------------------------------------------------------- trainer state


def rng_state() -> tuple[dict, dict]:
    """``(json_part, tensor_part)`` of the Python, NumPy, torch and CUDA RNG states."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    ts = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        ts["cuda"] = torch.cuda.get_rng_state_all()
    return js, ts


def set_rng_state(js: dict, ts: dict) -> None:
    v, keys, gauss = js["python"]
    random.setstate((v, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(ts["torch"])
    if "cuda" in ts and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ts["cuda"])


def write_trainer_state(tag_dir: Path, rank: int, state: dict) -> None:
    """Write rank ``rank``'s state: JSON for everything but the torch RNG tensors (atomic renames)."""
    js, ts = rng_state()
    body = {**state, "rng": js}
    pt, jp = tag_dir / f"trainer_state_rank{rank}.pt", tag_dir / f"trainer_state_rank{rank}.json"
    torch.save(ts, str(pt) + ".tmp")
    os.replace(str(pt) + ".tmp", pt)
    Path(str(jp) + ".tmp").write_text(json.dumps(body))
    os.replace(str(jp) + ".tmp", jp)


def read_trainer_state(tag_dir: Path, rank: int) -> tuple[dict, dict]:
    """``(json_state, rng_tensors)`` of rank ``rank``; :class:`~fvlm.errors.FvlmError` if missing
    or unreadable."""
    jp = tag_dir / f"trainer_state_rank{rank}.json"
    if not jp.is_file():
        raise FormatError(f"{jp} is missing (an older fvlm checkpoint, an interrupted save, "
                          "or a different number of processes)")
    try:
        js = json.loads(jp.read_text())
        for k in ("step", "micro", "world", "rng"):
            js[k]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{jp} is not a valid trainer state ({type(e).__name__})") from None
    ts = safe_torch_load(tag_dir / f"trainer_state_rank{rank}.pt", map_location="cpu", what="trainer state")
    if not isinstance(ts, dict) or not isinstance(ts.get("torch"), torch.Tensor):
        raise FormatError(f"{tag_dir / f'trainer_state_rank{rank}.pt'} holds no torch RNG state")
    return js, ts
