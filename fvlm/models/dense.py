"""The dense model (shared encoder + a dense head), its checkpoint, and sliding-window inference.

Dense checkpoint (``fvlm-dense-checkpoint`` v1, a ``torch.save`` of a plain dict that
loads with ``weights_only=True``): ``format``, ``version``, ``config`` (the resolved
``model`` section), ``task`` (``seg``/``text``), ``class_names``, ``text_dim``,
``text_model`` (identity of the text encoder used for prompts, or None),
``state_dict``, ``meta`` (free-form: steps, source checkpoint, metrics).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config import build, to_dict
from ..encoders import create_encoder, load_encoder_weights
from ..errors import FormatError, FvlmError, check_format
from ..torchfile import read_torch_file
from .dense_config import DenseModelConfig as ModelConfig
from .dense_heads import SegHead
from .text_seg import TextSegHead

__all__ = ["DenseModel", "build_dense_model", "adopt_pretrained_spec", "save_dense", "load_dense", "load_pretrained_encoder",
           "sliding_predict", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "fvlm-dense-checkpoint"
FORMAT_VERSION = 1
log = logging.getLogger("fvlm.dense")


class DenseModel(nn.Module):
    """Encoder + dense head.

    ``forward(x)`` -> ``(B, num_classes + 1, *spatial)`` softmax logits (``seg``), or
    ``forward(x, text)`` -> ``(B, K, *spatial)`` per-prompt sigmoid logits (``text``).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, levels: Sequence[int], task: str,
                 class_names: Sequence[str], freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.levels = [int(i) for i in levels]
        self.task = task
        self.class_names = list(class_names)
        self.freeze_encoder = freeze_encoder
        self.input_norm = None
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    @property
    def spatial_dims(self) -> int:
        return self.encoder.spatial_dims

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.input_norm is not None:
            x = (x - self.input_norm[0]) / self.input_norm[1]
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder.forward_intermediates(x, self.levels)
        return self.encoder.forward_intermediates(x, self.levels)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(x)
        if self.task == "text":
            if text is None:
                raise ValueError("the text head needs prompt embeddings: model(x, text)")
            return self.head(feats, x, text)
        return self.head(feats, x)


def _levels(cfg: ModelConfig, depth: int) -> list[int]:
    if cfg.levels:
        idx = sorted({i % depth for i in cfg.levels})
        if any(i >= depth or i < -depth for i in cfg.levels):
            raise FvlmError(f"model.levels {cfg.levels} out of range for an encoder of depth {depth}")
        return idx
    step = max(1, depth // 4)
    return sorted({depth - 1 - i * step for i in range(min(4, depth))})


def build_dense_model(cfg: ModelConfig, class_names: Sequence[str], text_dim: int | None = None) -> DenseModel:
    """Build encoder + head from the ``model`` config section (weights random unless ``pretrained``)."""
    enc = create_encoder(cfg.encoder, img_size=tuple(cfg.img_size), patch_size=tuple(cfg.patch_size),
                         in_chans=cfg.in_chans, **{"stem": cfg.encoder_stem, **cfg.encoder_args})
    sd = enc.spatial_dims
    levels = _levels(cfg, enc.depth)
    if cfg.head == "seg":
        head = SegHead(sd, enc.embed_dim, enc.patch_size, len(levels), len(class_names) + 1,
                       base_channels=cfg.base_channels, min_channels=cfg.min_channels, in_chans=cfg.in_chans,
                       stem_channels=cfg.stem_channels, upsample=cfg.upsample)
    else:
        if not text_dim:
            raise FvlmError("the text head needs the text encoder's width (text_dim)")
        head = TextSegHead(sd, enc.embed_dim, enc.patch_size, len(levels), text_dim, cost_dim=cfg.cost_dim,
                           agg_dim=cfg.agg_dim, agg_blocks=cfg.agg_blocks, guide_dim=cfg.guide_dim,
                           text_guide_dim=cfg.guide_dim, templates=len(cfg.templates), heads=cfg.heads,
                           min_channels=max(4, cfg.min_channels // 2), in_chans=cfg.in_chans,
                           stem_channels=max(4, cfg.stem_channels // 2) if cfg.stem_channels else 0,
                           learned_stages=cfg.learned_stages or None, upsample=cfg.upsample)
    if cfg.pretrained:
        load_pretrained_encoder(enc, cfg.pretrained)
    model = DenseModel(enc, head, levels, cfg.head, class_names, cfg.freeze_encoder)
    if cfg.input_norm:
        if len(cfg.input_norm) != 2 or cfg.input_norm[1] <= 0:
            raise FvlmError(f"model.input_norm must be [mean, std > 0], got {cfg.input_norm}")
        model.input_norm = (float(cfg.input_norm[0]), float(cfg.input_norm[1]))
    return model


def _read_checkpoint(path) -> dict:
    p = Path(path)
    raw = read_torch_file(p, "pretrained checkpoint")
    if not isinstance(raw, dict):
        raise FormatError(f"{p}: not a checkpoint dict")
    return raw


def adopt_pretrained_spec(cfg: ModelConfig) -> ModelConfig:
    """The model config with the encoder family, patch size and arguments of ``cfg.pretrained``.

    Reads the encoder description a pretraining checkpoint carries: ``config.image`` of a
    ``fvlm-model`` (`fvlm pretrain`), ``encoder_spec`` of a ``fvlm-xray-encoder``
    (`fvlm pretrain-xray`, including its input standardisation), ``config`` of a dense
    checkpoint. ``img_size`` stays the dense one (position embeddings are resized).
    """
    if not cfg.pretrained:
        return cfg
    raw = _read_checkpoint(cfg.pretrained)
    fmt = raw.get("format")
    spec: dict = {}
    if fmt == "fvlm-model" and isinstance(raw.get("config"), dict):
        im = raw["config"].get("image", {})
        spec = {"encoder": im.get("encoder"), "patch_size": im.get("patch_size"),
                "encoder_args": dict(im.get("encoder_args") or {})}
    elif fmt == "fvlm-xray-encoder" and isinstance(raw.get("encoder_spec"), dict):
        es = raw["encoder_spec"]
        spec = {"encoder": es.get("name"), "patch_size": es.get("patch_size"), "in_chans": es.get("in_chans"),
                "encoder_args": dict(es.get("kwargs") or {})}
        if es.get("pixel_mean") is not None and es.get("pixel_std") is not None:
            m, sd = es["pixel_mean"], es["pixel_std"]
            spec["input_norm"] = [float(np.mean(m)), float(np.mean(sd))]
    elif fmt == FORMAT_NAME:
        c = raw["config"]
        spec = {k: c.get(k) for k in ("encoder", "patch_size", "in_chans", "encoder_args", "input_norm")}
    spec = {k: v for k, v in spec.items() if v not in (None, [], {})}
    for k in ("img_size", "in_chans", "spatial_dims", "patch_size", "stem"):
        spec.get("encoder_args", {}).pop(k, None)
    if not spec:
        return cfg
    new = dataclasses.replace(cfg, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()})
    if len(new.img_size) != len(new.patch_size) or any(s % p for s, p in zip(new.img_size, new.patch_size)):
        raise FvlmError(f"{cfg.pretrained}: its encoder uses patch size {list(new.patch_size)}; model.img_size "
                        f"{list(cfg.img_size)} must have as many values and be divisible by it")
    changed = {k: v for k, v in spec.items() if getattr(cfg, k) != getattr(new, k)}
    if changed:
        log.info("encoder settings taken from %s: %s", cfg.pretrained, changed)
    return new


def load_pretrained_encoder(enc: nn.Module, path: str | os.PathLike) -> dict:
    """Initialise ``enc`` from a consolidated checkpoint (weights under ``image_encoder.``).

    Works for `fvlm pretrain` (3D CT) and `fvlm pretrain-xray` (2D) checkpoints, and for
    a dense checkpoint (weights under ``encoder.``). Position embeddings are resized and
    2D patch kernels inflated by :func:`fvlm.encoders.load_encoder_weights`; it refuses a
    checkpoint of which no encoder tensor loads (wrong family or size).
    """
    p = Path(path)
    raw = _read_checkpoint(p)
    sd = raw.get("state_dict", raw.get("model", raw))
    if not isinstance(sd, dict):
        raise FormatError(f"{p}: no state dict inside")
    prefix = next((pre for pre in ("image_encoder.", "encoder.") if any(k.startswith(pre) for k in sd)), None)
    if prefix is None:
        raise FormatError(f"{p}: no image encoder weights (expected keys under 'image_encoder.')")
    rep = load_encoder_weights(enc, sd, prefix=prefix)
    if not rep.loaded:
        raise FvlmError(f"{p}: no encoder weight fits this encoder ({rep.summary()}); "
                        "set model.encoder/img_size/patch_size to the pretraining ones")
    if rep.missing or rep.mismatched:
        # a partial load is legitimate (e.g. another depth) but should never pass unnoticed
        log.warning("encoder only partly initialised from %s: %s", p, rep.summary())
    else:
        log.info("encoder initialised from %s: %s", p, rep.summary())
    return {"path": str(p), "summary": rep.summary(), "format": raw.get("format")}


def save_dense(path: str | os.PathLike, model: DenseModel, cfg: ModelConfig, text_identity: dict | None = None,
               text_dim: int | None = None, meta: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write a dense checkpoint atomically; ``state_dict`` (default: the model's own) is the weights
    to store, e.g. the trainer's gathered fp32 master weights under ZeRO-3 or bf16."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": to_dict(cfg), "task": model.task,
            "class_names": list(model.class_names), "text_dim": text_dim, "text_model": text_identity,
            "state_dict": {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()},
            "meta": meta or {}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_dense(path: str | os.PathLike) -> tuple[DenseModel, dict]:
    """Rebuild a dense model from its checkpoint -> ``(model, blob without state_dict)``."""
    p = Path(path)
    blob = read_torch_file(p, "dense checkpoint")
    check_format(blob, FORMAT_NAME, FORMAT_VERSION, p, what="a dense checkpoint",
                 format_hint="; to start from a pretraining checkpoint use `fvlm dense train --pretrained`")
    # checkpoints from before model.upsample existed were all transposed (the default then)
    cfg = build(ModelConfig, {"upsample": "transposed", **blob["config"], "pretrained": None})
    model = build_dense_model(cfg, blob["class_names"], blob.get("text_dim"))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    info["model_config"] = cfg
    return model, info


@torch.no_grad()
def sliding_predict(model: DenseModel, image: torch.Tensor, roi: Sequence[int], text: torch.Tensor | None = None,
                    overlap: float = 0.25, sw_batch_size: int = 2) -> torch.Tensor:
    """Logits over a whole image of any size, ``(B, C, *spatial)`` -> ``(B, K, *spatial)``.

    Windows of the encoder's ``img_size`` (MONAI's sliding window, Gaussian blending);
    images smaller than a window are padded inside MONAI and cropped back.
    """
    from monai.inferers import sliding_window_inference

    def fn(x):
        return model(x, text) if text is not None else model(x)

    return sliding_window_inference(image, tuple(roi), sw_batch_size, fn, overlap=overlap, mode="gaussian")
