"""Load what the suite evaluates: the checkpoint's model and its input transform, the taxonomy, the shards.

The suite itself only needs duck-typed objects (see ``fvlm.eval.zeroshot``); this
module connects it to the real pieces owned by other stages:

- ``fvlm.models.checkpoint.load_consolidated(path) -> (model, meta)``;
- the function turning ``CaseRecord``s into the model's batch (looked up on the
  model as ``make_batch`` / ``batch_from_records``, else in ``fvlm.data``);
- ``fvlm.taxonomy.load_taxonomy`` and ``fvlm.data.shards.ShardDataset``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from ..errors import FvlmError

# where the model-input transform may live, in order of preference: (module, function)
_BATCH_FUNCTIONS = (("fvlm.data.ct", "make_batch"), ("fvlm.data.ct", "collate_records"),
                    ("fvlm.data.batch", "make_batch"), ("fvlm.data.transforms", "make_batch"))


def pick_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FvlmError(f"device {name!r} requested but CUDA is not available (use --set device=cpu)")
    return name


def load_taxonomy(name_or_path: str):
    try:
        mod = importlib.import_module("fvlm.taxonomy")
    except ModuleNotFoundError as e:
        if e.name == "fvlm.taxonomy":
            raise FvlmError("fvlm.taxonomy is not available in this installation") from None
        raise
    return mod.load_taxonomy(name_or_path)


def open_shards(root: str):
    from ..data.shards import ShardDataset

    if not Path(root).is_dir():
        raise FvlmError(f"--data {root}: not a directory (expected the output of `fvlm preprocess`)")
    return ShardDataset(root)


def _batch_function(model, meta: dict) -> Callable | None:
    for attr in ("make_batch", "batch_from_records"):
        fn = getattr(model, attr, None)
        if callable(fn):
            return fn
    for mod_name, fn_name in _BATCH_FUNCTIONS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError:
            continue
        fn = getattr(mod, fn_name, None)
        if callable(fn):
            return lambda records, _fn=fn: _fn(records, model=model, meta=meta)
    return None


def load_model(path: str, device: str = "auto") -> tuple[Any, dict, Callable]:
    """``(model in eval mode on device, checkpoint meta, make_batch(records) -> batch on device)``."""
    if not Path(path).is_file():
        raise FvlmError(f"--checkpoint {path}: no such file")
    try:
        ck = importlib.import_module("fvlm.models.checkpoint")
    except ModuleNotFoundError as e:
        if e.name in ("fvlm.models.checkpoint", "fvlm.models"):
            raise FvlmError("fvlm.models.checkpoint (load_consolidated) is not available in this "
                            "installation; cannot load a checkpoint") from None
        raise
    model, meta = ck.load_consolidated(path)
    dev = pick_device(device)
    if hasattr(model, "to"):
        model = model.to(dev)
    if hasattr(model, "eval"):
        model.eval()
    fn = _batch_function(model, meta or {})
    if fn is None:
        raise FvlmError("no model-input transform found for this checkpoint (expected model.make_batch or "
                        "fvlm.data.ct.make_batch)")

    def make_batch(records):
        return _to_device(fn(records), dev)

    return model, dict(meta or {}), make_batch


def _to_device(batch, device: str):
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
