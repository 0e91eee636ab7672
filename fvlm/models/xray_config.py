"""Typed config of the X-ray MAE network (``model:`` of ``fvlm pretrain-xray``, configs/xray/default.yaml).

It lives beside the model so :func:`fvlm.models.xray_mae.build_xray_mae` takes it typed;
``fvlm.xray.config`` re-exports it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt

__all__ = ["XrayModelConfig"]


@dataclass
class XrayModelConfig:
    encoder: str = opt("vit2d_tiny", "2D encoder name from the registry (fvlm.encoders.list_encoders())")
    patch_size: int = opt(16, "square patch size in pixels")
    in_chans: int = opt(1, "input channels")
    decoder_dim: int = opt(256, "MAE decoder width")
    decoder_depth: int = opt(4, "MAE decoder blocks")
    decoder_heads: int = opt(8, "MAE decoder attention heads")
    grad_checkpointing: bool = opt(False, "recompute encoder/decoder blocks in backward to save memory")
    pixel_mean: float = opt(0.5, "input standardisation: mean of the [0, 1] pixels")
    pixel_std: float = opt(0.25, "input standardisation: std of the [0, 1] pixels")
    encoder_kwargs: dict = opt({}, "extra keyword arguments for create_encoder (e.g. pos_embed: learned)")
