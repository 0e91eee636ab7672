"""Config of the dense model (encoder + segmentation or text-driven head): the ``model`` section
of ``fvlm dense`` (defaults in ``configs/dense/default.yaml``). No torch import here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import opt

__all__ = ["DenseModelConfig"]


@dataclass
class DenseModelConfig:
    encoder: str = opt("vit3d_nano", "encoder name in the fvlm.encoders registry (vit2d_* for X-ray / CT slices)")
    img_size: list[int] = opt([64, 64, 32], "encoder input = training crop = sliding-window size, (X, Y, Z) or (H, W)")
    patch_size: list[int] = opt([8, 8, 4], "encoder patch size, same axis order as img_size")
    in_chans: int = opt(1, "input channels")
    encoder_args: dict[str, Any] = opt({}, "extra encoder arguments (e.g. {depth: 4, embed_dim: 96}); "
                                           "taken from model.pretrained when it names them")
    input_norm: list[float] = opt([], "[mean, std] standardising the encoder input (empty = none; "
                                      "taken from an X-ray encoder checkpoint)")
    encoder_stem: str = opt("linear", "encoder patch-embedding stem", choices=("linear", "conv"))
    levels: list[int] = opt([], "encoder blocks feeding the head, shallow to deep (negative = from the end); "
                                "empty = 4 evenly spaced incl. the last")
    head: str = opt("seg", "seg: fixed classes (softmax); text: prompt-conditioned cost aggregation (sigmoid)",
                    choices=("seg", "text"))
    base_channels: int = opt(64, "decoder width at the bottleneck (halves per upsampling stage)")
    min_channels: int = opt(16, "decoder width floor (the full-resolution stages)")
    stem_channels: int = opt(16, "width of the image stem joining the last stage (0 = none)")
    freeze_encoder: bool = opt(False, "keep the encoder fixed (no gradients, eval mode)")
    pretrained: str | None = opt(None, "consolidated checkpoint of `fvlm pretrain` / `fvlm pretrain-xray` "
                                       "whose image encoder initialises this one")
    text_model_dir: str | None = opt(None, "text model directory (default: the shipped MiniLM)")
    templates: list[str] = opt(["{}"], "text head: prompt templates, '{}' = class or finding phrase; "
                                       "one cost channel per template")
    cost_dim: int = opt(64, "text head: width of the shared image/text space of the cost volume")
    agg_dim: int = opt(32, "text head: channels per prompt during aggregation")
    agg_blocks: int = opt(2, "text head: (spatial, class) aggregation block pairs")
    guide_dim: int = opt(32, "text head: width of the image/text guidance")
    heads: int = opt(2, "text head: attention heads of class aggregation")
    upsample: str = opt("interp", "learned upsampling: interp (interpolation + convolution; the default: no "
                                  "checkerboard, and as good or better in the measurements of seg3d_tiny.yaml) or "
                                  "transposed (kernel = stride, leaves checkerboard artifacts)",
                        choices=("transposed", "interp"))
    learned_stages: int = opt(2, "text head: learned x2 upsampling stages per prompt; the rest is interpolated "
                                 "(0 = all learned)")
