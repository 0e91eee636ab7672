"""Models by name: ``create_model(name, cfg)``; the consolidated checkpoint format in ``checkpoint``.

Each registry entry imports its model module when called, so ``import fvlm.models.model_dir``
(and ``fvlm export --help``) does not load torch.
"""
from __future__ import annotations

from typing import Any, Callable

from ..config import build
from ..errors import FvlmError

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, cfg=None, **kw):
    """Build a model. ``cfg``: its config dataclass, a plain mapping of it, or None (defaults)."""
    if name not in _REGISTRY:
        raise FvlmError(f"unknown model '{name}' (known: {', '.join(list_models())})")
    return _REGISTRY[name](cfg, **kw)


def _fvlm_cfg(cfg, **force):
    from .fvlm import FVLMConfig

    if cfg is None:
        cfg = FVLMConfig()
    elif isinstance(cfg, dict):
        cfg = build(FVLMConfig, cfg)
    for k, v in force.items():
        setattr(cfg, k, v)
    return cfg


@register_model("fvlm")
def _fvlm(cfg=None, **kw):
    """Fine-grained (per-anatomy + global) model; ``cfg.mode`` volume or crop."""
    from .fvlm import FVLM

    return FVLM(_fvlm_cfg(cfg), **kw)


@register_model("clip")
def _clip(cfg=None, **kw):
    """Global-only CLIP baseline in the same code (``mode: global``)."""
    from .fvlm import FVLM

    return FVLM(_fvlm_cfg(cfg, mode="global", use_global=True), **kw)


@register_model("xray_mae")
def _xray_mae(cfg=None, **kw):
    """2D masked image modelling network for radiographs (``fvlm pretrain-xray``).

    ``cfg``: an :class:`~fvlm.models.xray_config.XrayModelConfig`, a mapping of its keys
    (``XrayMAE.config`` included), or None;
    ``img_size=`` (the input side, ``data.size``) unless the mapping carries it.
    """
    from .xray_mae import build_xray_mae

    return build_xray_mae(cfg, **kw)


@register_model("dense")
def _dense(cfg=None, *, class_names, text_dim=None):
    """Shared encoder + dense head (``seg``: fixed classes; ``text``: prompt-conditioned), ``fvlm dense``.

    ``cfg``: a ``DenseModelConfig``, a mapping of its keys, or None; ``class_names`` the segmented
    anatomies in label order; ``text_dim`` the text encoder's width (text head).
    """
    from .dense import build_dense_model
    from .dense_config import DenseModelConfig

    if cfg is None or isinstance(cfg, dict):
        cfg = build(DenseModelConfig, cfg or {})
    return build_dense_model(cfg, class_names, text_dim)


__all__ = ["create_model", "list_models", "register_model"]
