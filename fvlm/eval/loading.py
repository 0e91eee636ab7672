"""Load what the suite evaluates: the checkpoint's model and its input transform, the taxonomy, the shards.

The suite itself only needs duck-typed objects (see ``fvlm.eval.zeroshot``); this
module connects it to the real pieces owned by other stages:

- ``fvlm.models.checkpoint.load_consolidated(path) -> (model, meta)``;
- ``fvlm.data.ct.make_batch_fn(meta["data"])``, the training input transform;
- ``fvlm.taxonomy.load_taxonomy`` and ``fvlm.data.shards.ShardDataset``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from ..data.ct import SampleOptions, make_batch_fn
from ..data.shards import ShardDataset
from ..devices import to_device
from ..errors import FvlmError
from ..hashing import file_sha256
from ..models.model_dir import model_dir_sha256

def pick_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FvlmError(f"device {name!r} requested but CUDA is not available (use --set device=cpu)")
    return name


def taxonomy_name(given, meta: dict) -> str:
    """``given``, else the checkpoint's taxonomy, else fvlm54."""
    name = given or meta.get("taxonomy") or "fvlm54"
    if isinstance(name, dict):
        name = name.get("name") or "fvlm54"
    return str(name)


def load_taxonomy(name_or_path: str):
    try:
        mod = importlib.import_module("fvlm.taxonomy")
    except ModuleNotFoundError as e:
        if e.name == "fvlm.taxonomy":
            raise FvlmError("fvlm.taxonomy is not available in this installation") from None
        raise
    return mod.load_taxonomy(name_or_path)


def open_shards(root: str):
    if not Path(root).is_dir():
        raise FvlmError(f"--data {root}: not a directory (expected the output of `fvlm preprocess`)")
    return ShardDataset(root)


def batch_function(model, meta: dict) -> tuple[Callable, dict]:
    """``(records -> batch, kwargs for dataset.get)`` for a loaded checkpoint.

    The transform is the training one (``fvlm.data.ct.make_batch_fn``) built from the
    sample options the checkpoint embeds (``meta["data"]``), so evaluation sees exactly
    the inputs the model was trained on. Only the arrays it uses are read from the shards.
    """
    fn = getattr(model, "make_batch", None)
    if callable(fn):
        return fn, {}
    opts = meta.get("data") or meta.get("sample_options")
    if not opts:
        raise FvlmError("the checkpoint carries no data options (meta['data']); cannot build model inputs")

    so = opts if isinstance(opts, SampleOptions) else SampleOptions.from_dict(opts)
    return make_batch_fn(so), {"volume": so.volume_size is not None, "crops": so.crop_size is not None}


def check_checkpoint_path(path: str) -> Path:
    """A consolidated ``.pt`` file or a model directory (``fvlm export``), else a one-line error."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FvlmError(f"--checkpoint {path}: a folder without config.json (a model directory is written "
                            "by `fvlm export`; a DeepSpeed checkpoint folder is not a model: use its model.pt)")
        return p
    if not p.is_file():
        raise FvlmError(f"--checkpoint {path}: no such file or model directory")
    return p


def checkpoint_sha256(path: str) -> str:
    """Identity recorded in results and thresholds: the file's SHA-256, or a model directory's
    (``fvlm.models.model_dir.model_dir_sha256``)."""
    p = check_checkpoint_path(path)
    if p.is_dir():
        return model_dir_sha256(p)
    return file_sha256(p)


def load_model(path: str, device: str = "auto", dtype=None) -> tuple[Any, dict, Callable]:
    """``(model in eval mode on device, checkpoint meta, make_batch(records) -> batch on device)``.

    ``path``: a consolidated checkpoint or a model directory. ``dtype`` (e.g. ``torch.bfloat16``)
    casts the model's weights; inputs follow the weights inside the model.
    """
    check_checkpoint_path(path)
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
        model = model.to(dev) if dtype is None else model.to(dev, dtype=dtype)
    if hasattr(model, "eval"):
        model.eval()
    fn, get_kwargs = batch_function(model, meta or {})

    def make_batch(records):
        return to_device(fn(records), dev)

    make_batch.get_kwargs = get_kwargs
    if hasattr(fn, "load"):   # read cases from a source exactly as training does (host + device stages)

        make_batch.load = make_batch_fn(fn.opts, device=dev).load
        make_batch.opts = fn.opts
    return model, dict(meta or {}), make_batch
