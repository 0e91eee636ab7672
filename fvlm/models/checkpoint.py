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

from ..errors import FormatError, FvlmError

__all__ = ["FORMAT", "VERSION", "IMAGE_ENCODER_PREFIX", "save_consolidated", "load_consolidated",
           "read_consolidated", "image_encoder_state_dict"]

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
    from ..config import to_dict

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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def _version() -> str:
    from .. import __version__

    return __version__


def read_consolidated(path: str | os.PathLike) -> dict:
    """Load and check the raw dict (no model built)."""
    path = Path(path)
    if not path.is_file():
        raise FvlmError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a format problem here
        raise FormatError(f"{path}: not a loadable fvlm model file ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FormatError(f"{path}: not an {FORMAT} file (a DeepSpeed checkpoint directory? use the "
                          "consolidated model.pt written next to it)")
    if int(obj.get("version", -1)) != VERSION:
        raise FormatError(f"{path}: {FORMAT} version {obj.get('version')} is not supported "
                          f"(this fvlm reads version {VERSION})")
    return obj


def load_consolidated(path: str | os.PathLike, text_model_dir: str | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model from a consolidated file -> ``(model in eval mode, meta)``.

    ``text_model_dir`` overrides where an external (frozen, not stored) text encoder is read.
    """
    from . import create_model

    obj = read_consolidated(path)
    cfg = dict(obj["config"])
    meta = dict(obj["meta"])
    if text_model_dir is not None:
        cfg["text"] = {**cfg.get("text", {}), "model_dir": str(text_model_dir)}
    cfg.setdefault("image", {})
    cfg["image"] = {**cfg["image"], "pretrained": None}
    model = create_model(obj["model"], cfg)
    want = (meta.get("text_identity") or {}).get("config_sha256")
    have = model.text_identity.get("config_sha256")
    if meta.get("text_weights") == "external" and want and have and want != have:
        raise FvlmError(f"{path}: the text model found ({model.text_identity.get('path')}) differs from the one "
                        f"it was trained with ({meta['text_identity'].get('name')}); pass text_model_dir")
    res = model.load_state_dict(obj["state_dict"], strict=False)
    missing = [k for k in res.missing_keys if not (meta.get("text_weights") == "external" and k.startswith(TEXT_PREFIX))]
    if missing or res.unexpected_keys:
        raise FormatError(f"{path}: weights do not match the model config "
                          f"(missing {missing[:3]}, unexpected {res.unexpected_keys[:3]})")
    return model.to(device).eval(), meta


def image_encoder_state_dict(path_or_obj) -> dict:
    """Just the image encoder's weights (prefix stripped), for the dense heads."""
    obj = read_consolidated(path_or_obj) if not isinstance(path_or_obj, dict) else path_or_obj
    n = len(IMAGE_ENCODER_PREFIX)
    return {k[n:]: v for k, v in obj["state_dict"].items() if k.startswith(IMAGE_ENCODER_PREFIX)}
