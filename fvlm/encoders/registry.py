"""Encoder registry: sizes by name, ``create_encoder(name, **overrides)``."""
from __future__ import annotations

from typing import Callable

from ..errors import FvlmError
from .vit import VisionTransformer

_REGISTRY: dict[str, Callable[..., VisionTransformer]] = {}
_DEFAULTS: dict[str, dict] = {}

#: ViT widths/depths/heads by size (the usual ViT family; "nano" is a CPU-demo size).
SIZES = {
    "nano": dict(embed_dim=96, depth=4, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
#: Default input grids: 2D chest X-ray at 224 px; 3D CT in (X, Y, Z) at 1 x 1 x 3 mm as in
#: fVLM (352 x 256 x 112 voxels, patches 32 x 16 x 16 -> 11 x 16 x 7 = 1232 tokens).
_SPATIAL = {
    2: dict(img_size=(224, 224), patch_size=(16, 16)),
    3: dict(img_size=(352, 256, 112), patch_size=(32, 16, 16)),
}


def register_encoder(name: str, **defaults):
    """Register a constructor under ``name`` with default keyword arguments."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        _REGISTRY[name] = fn
        _DEFAULTS[name] = dict(defaults)
        return fn
    return deco


def _make(spatial_dims: int, size: str):
    defaults = dict(spatial_dims=spatial_dims, **_SPATIAL[spatial_dims], **SIZES[size])

    def ctor(**kw):
        return VisionTransformer(**{**defaults, **kw})

    ctor.__name__ = f"vit{spatial_dims}d_{size}"
    ctor.__doc__ = f"ViT-{size} for {spatial_dims}D inputs ({SIZES[size]})"
    register_encoder(ctor.__name__, **defaults)(ctor)


for _d in (2, 3):
    for _s in SIZES:
        _make(_d, _s)


def list_encoders() -> list[str]:
    """Names of all registered encoders."""
    return sorted(_REGISTRY)


def encoder_defaults(name: str) -> dict:
    return dict(_DEFAULTS[name])


def create_encoder(name: str, **overrides) -> VisionTransformer:
    """Build a registered encoder, e.g. ``create_encoder("vit3d_tiny", img_size=(96, 96, 48))``."""
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FvlmError(f"unknown encoder '{name}'{hint} (known: {', '.join(list_encoders())})")
    try:
        return _REGISTRY[name](**overrides)
    except (TypeError, ValueError) as e:
        raise FvlmError(f"cannot build encoder '{name}': {e}") from None
