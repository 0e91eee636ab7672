"""The consolidated model file (``fvlm-model`` v1, docs/FORMATS.md "Checkpoint").

A plain dict saved with ``torch.save``, loadable with ``torch.load(weights_only=True)``::

    {"format": "fvlm-model", "version": 1,
     "model": "fvlm",                      # registry name for fvlm.models.create_model
     "config": {...},                      # the model config (plain YAML-safe mapping)
     "state_dict": {name: tensor},         # float32, CPU; image encoder under "image_encoder."
     "meta": {...}}                        # anatomies, data/window, text identity, step, ...

Frozen text-encoder weights are left out by default (``text_weights: "external"`` in meta):
the loader rebuilds the text encoder from ``config.text.model_dir`` (or the shipped default)
and checks ``meta.text_identity.config_sha256``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..atomic import replacing
from ..config import build, to_dict
from ..data.ct import SampleOptions
from ..errors import FormatError, FvlmError, check_format
from ..torchfile import torch_load_error
from ..version import __version__
from . import create_model
from .model_dir import read_model_dir

__all__ = ["FORMAT", "VERSION", "IMAGE_ENCODER_PREFIX", "save_consolidated", "load_consolidated",
           "read_consolidated", "image_encoder_state_dict", "check_state_dict", "build_from_obj"]

FORMAT = "fvlm-model"
VERSION = 1
IMAGE_ENCODER_PREFIX = "image_encoder."
TEXT_PREFIX = "text_encoder."


def _plain(x):
    """Make meta values weights_only-safe (str/int/float/bool/None/list/dict)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)


def save_consolidated(path: str | os.PathLike, model, meta: dict | None = None, model_name: str | None = None,
                      state_dict: dict | None = None, include_frozen_text: bool = False) -> Path:
    """Write ``model`` (an :class:`~fvlm.models.fvlm.FVLM`) atomically to ``path``.

    ``state_dict`` overrides the model's own (e.g. fp32 master weights gathered from a
    ZeRO checkpoint). ``meta`` is merged over what the model knows about itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    frozen_text = bool(getattr(model.cfg.text, "freeze", False)) and model.cfg.text.model_dir != "tiny-random"
    drop_text = frozen_text and not include_frozen_text
    sd = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
          for k, v in sd.items() if not (drop_text and k.startswith(TEXT_PREFIX))}
    m = {"anatomies": list(model.anatomies), "names": list(model.names), "embed_dim": model.cfg.embed_dim,
         "text_identity": model.text_identity, "text_weights": "external" if drop_text else "included",
         "image_encoder_prefix": IMAGE_ENCODER_PREFIX, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "fvlm_version": _version()}
    m.update(meta or {})
    obj = {"format": FORMAT, "version": VERSION,
           "model": model_name or ("clip" if model.cfg.mode == "global" else "fvlm"),
           "config": _plain(to_dict(model.cfg)), "state_dict": sd, "meta": _plain(m)}
    with replacing(path) as tmp:   # Ctrl-C or a full disk mid-write: the previous file stays, no .tmp beside it
        torch.save(obj, tmp)
    return path


def _version() -> str:
    return __version__


def _first_line(e: BaseException) -> str:
    """One line for an exception (torch's refused-pickle message included), never an IndexError."""
    return torch_load_error(e)


def read_consolidated(path: str | os.PathLike) -> dict:
    """Load and check the raw dict (no model built).

    ``path`` is a consolidated ``.pt`` file or a model directory written by ``fvlm export``
    (``fvlm.models.model_dir``); both give the same dict. Nothing is ever unpickled
    (``torch.load(weights_only=True)`` or safetensors).
    """
    path = Path(path)
    if path.is_dir():
        return read_model_dir(path)
    if not path.is_file():
        raise FvlmError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: empty file (0 bytes; an interrupted copy or save?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a format problem here
        raise FormatError(f"{path}: not a loadable fvlm model file ({_first_line(e)})") from None
    check_format(obj, FORMAT, VERSION, path, what=f"an {FORMAT} file",
                 format_hint="; a DeepSpeed checkpoint directory? use the consolidated model.pt written next to it")
    for key in ("config", "state_dict", "meta"):
        if not isinstance(obj.get(key), dict):
            raise FormatError(f"{path}: the {FORMAT} file has no '{key}' mapping (truncated or hand-made?)")
    return obj


def check_state_dict(want: dict, have: dict, where: str, skip_prefix: str | None = None) -> None:
    """One-line :class:`FormatError` naming the first tensor that is missing, extra or of another shape.

    ``want``: the freshly built model's ``state_dict()``; ``have``: the file's tensors;
    tensors under ``skip_prefix`` may be missing (an external text encoder).
    """
    for k, v in want.items():
        if k not in have:
            if skip_prefix and k.startswith(skip_prefix):
                continue
            raise FormatError(f"{where}: tensor '{k}' is missing (the model config needs shape "
                              f"{list(v.shape)})")
        h = have[k]
        if not isinstance(h, torch.Tensor):
            raise FormatError(f"{where}: '{k}' is not a tensor")
        if tuple(h.shape) != tuple(v.shape):
            raise FormatError(f"{where}: tensor '{k}' has shape {list(h.shape)}, the model config expects "
                              f"{list(v.shape)} (weights of another model size?)")
        if h.dtype != v.dtype:
            raise FormatError(f"{where}: tensor '{k}' is {str(h.dtype).replace('torch.', '')}, the model "
                              f"stores {str(v.dtype).replace('torch.', '')} (weights saved in another dtype); refused")
        if h.is_floating_point() and not bool(torch.isfinite(h).all()):
            n = int((~torch.isfinite(h)).sum())
            raise FormatError(f"{where}: tensor '{k}' has {n} non-finite value(s) (NaN or inf); refused")
    extra = [k for k in have if k not in want]
    if extra:
        raise FormatError(f"{where}: tensor '{extra[0]}' is not part of the model the config describes"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _check_sizes(cfg: dict, meta: dict, where) -> None:
    """Input sizes of a checkpoint's config and sample options: lists of positive integers (a zero
    would divide by zero deep in the model or the transform)."""
    img = cfg.get("image") if isinstance(cfg.get("image"), dict) else {}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    for name, v in (("config.image.img_size", img.get("img_size")), ("config.image.patch_size", img.get("patch_size")),
                    ("meta.data.volume_size", data.get("volume_size")), ("meta.data.crop_size", data.get("crop_size"))):
        if v is None:
            continue
        vals = v if isinstance(v, (list, tuple)) else [v]
        if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in vals):
            raise FormatError(f"{where}: {name} {v!r} must be positive integers")
    if "data" in meta and meta["data"] is not None:
        _check_sample_options(meta["data"], where)


def _check_sample_options(data, where) -> None:
    """``meta["data"]`` (the input transform's options) must build ``SampleOptions`` with sane values."""
    if not isinstance(data, dict):
        raise FormatError(f"{where}: meta.data must be a mapping of sample options, got {type(data).__name__}")
    try:
        so = build(SampleOptions, data)
    except FvlmError as e:
        raise FormatError(f"{where}: meta.data: {e}") from None
    for name, (lo, hi) in [("window", so.window), *((f"anatomy_windows.{a}", w) for a, w in so.anatomy_windows.items())]:
        if not lo < hi:
            raise FormatError(f"{where}: meta.data.{name} must be [lo, hi] with lo < hi (HU), got [{lo}, {hi}]")


def build_from_obj(obj: dict, where: str | os.PathLike, text_model_dir: str | None = None):
    """Rebuild the model of a checked raw dict (:func:`read_consolidated`) -> ``(model, meta)``."""
    cfg = dict(obj["config"])
    meta = dict(obj["meta"])
    if text_model_dir is not None:
        cfg["text"] = {**cfg.get("text", {}), "model_dir": str(text_model_dir)}
    cfg.setdefault("image", {})
    cfg["image"] = {**cfg["image"], "pretrained": None}
    _check_sizes(cfg, meta, where)
    try:
        model = create_model(obj["model"], cfg)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as e:
        raise FormatError(f"{where}: the model config cannot be built ({_first_line(e)})") from None
    want = (meta.get("text_identity") or {}).get("config_sha256")
    have = model.text_identity.get("config_sha256")
    if meta.get("text_weights") == "external" and want and have and want != have:
        raise FvlmError(f"{where}: the text model found ({model.text_identity.get('path')}) differs from the one "
                        f"it was trained with ({meta['text_identity'].get('name')}); pass text_model_dir")
    external = meta.get("text_weights") == "external"
    check_state_dict(model.state_dict(), obj["state_dict"], str(where), TEXT_PREFIX if external else None)
    try:
        model.load_state_dict(obj["state_dict"], strict=False)
    except RuntimeError as e:  # shapes are checked above; a dtype or storage problem lands here
        raise FormatError(f"{where}: weights do not load into the model ({_first_line(e)})") from None
    return model, meta


def load_consolidated(path: str | os.PathLike, text_model_dir: str | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model from a consolidated file or a model directory -> ``(model in eval mode, meta)``.

    ``text_model_dir`` overrides where an external (frozen, not stored) text encoder is read;
    a model directory that holds its text model (``text/``) uses that one by default.
    Errors (empty, truncated or foreign files, another model size, one tensor of another
    shape) are one-line :class:`~fvlm.errors.FormatError` messages naming the problem.
    """
    obj = read_consolidated(path)
    if text_model_dir is None:
        text_model_dir = obj.get("_text_model_dir")
    where = Path(path) / "model.safetensors" if Path(path).is_dir() else path
    model, meta = build_from_obj(obj, where, text_model_dir)
    return model.to(device).eval(), meta


def image_encoder_state_dict(path_or_obj) -> dict:
    """Just the image encoder's weights (prefix stripped), for the dense heads."""
    obj = read_consolidated(path_or_obj) if not isinstance(path_or_obj, dict) else path_or_obj
    n = len(IMAGE_ENCODER_PREFIX)
    return {k[n:]: v for k, v in obj["state_dict"].items() if k.startswith(IMAGE_ENCODER_PREFIX)}
