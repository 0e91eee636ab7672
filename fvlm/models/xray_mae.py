"""Masked image modelling network for 2D chest radiographs: the shared ViT + a light decoder.

:class:`XrayMAE` wraps a 2D encoder from :mod:`fvlm.encoders` (``spatial_dims=2``) and a
transformer decoder of configurable width and depth that predicts every patch's pixels.

- MAE: ``model(images, keep)`` - the encoder sees only the visible patches ``keep``
  (B, K); the decoder fills the hidden places with a learned mask token.
- GMML: ``model(corrupted_images)`` - the encoder sees all patches (some corrupted);
  the decoder predicts the clean pixels everywhere.

The network returns predictions only; losses live in :mod:`fvlm.losses.mae`.

The encoder is saved on its own for downstream use with :func:`save_encoder` (format
``fvlm-xray-encoder``, docs/FORMATS.md) and read back with :func:`load_encoder`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..encoders import create_encoder, encoder_defaults, list_encoders, load_encoder_weights, sincos_pos_embed
from ..encoders.vit import Block
from ..errors import FormatError, FvlmError, check_format
from ..torchfile import read_torch_file
from .xray_config import XrayModelConfig

__all__ = ["XrayMAE", "build_xray_mae", "save_encoder", "load_encoder", "ENCODER_FORMAT", "ENCODER_VERSION"]

ENCODER_FORMAT = "fvlm-xray-encoder"
ENCODER_VERSION = 1


class XrayMAE(nn.Module):
    """Encoder (from the registry) + MAE decoder over a square or rectangular 2D input.

    ``img_size``: (H, W) or int; ``patch_size``: (ph, pw) or int. ``pixel_mean/std``
    standardise the [0, 1] input before the encoder (targets are computed on the raw
    image by the loss). ``encoder_kwargs`` pass through to :func:`create_encoder`.
    """

    def __init__(self, encoder: str = "vit2d_tiny", img_size: int | tuple[int, int] = 224,
                 patch_size: int | tuple[int, int] = 16, in_chans: int = 1, decoder_dim: int = 256,
                 decoder_depth: int = 4, decoder_heads: int = 8, grad_checkpointing: bool = False,
                 pixel_mean: float = 0.5, pixel_std: float = 0.25, encoder_kwargs: dict | None = None):
        super().__init__()
        if encoder in list_encoders() and encoder_defaults(encoder).get("spatial_dims", 2) != 2:
            raise FvlmError(f"encoder '{encoder}' is not 2D; the X-ray MAE needs a 2D encoder (a vit2d_* name)")

        img = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        self.encoder_name = encoder
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.encoder = create_encoder(encoder, img_size=img, patch_size=patch, in_chans=in_chans,
                                      grad_checkpointing=grad_checkpointing, **self.encoder_kwargs)
        if self.encoder.spatial_dims != 2:
            raise FvlmError(f"encoder '{encoder}' is {self.encoder.spatial_dims}D; the X-ray MAE needs a 2D "
                            "encoder (a vit2d_* name)")
        self.config: dict[str, Any] = dict(encoder=encoder, img_size=list(img), patch_size=list(patch),
                                           in_chans=in_chans, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                                           decoder_heads=decoder_heads, grad_checkpointing=grad_checkpointing,
                                           pixel_mean=pixel_mean, pixel_std=pixel_std,
                                           encoder_kwargs=self.encoder_kwargs)
        self.patch_size = patch
        self.in_chans = in_chans
        self.grad_checkpointing = grad_checkpointing
        self.register_buffer("pixel_mean", torch.tensor(float(pixel_mean)), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(float(pixel_std)), persistent=False)
        e = self.encoder.embed_dim
        self.decoder_embed = nn.Linear(e, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch[0] * patch[1] * in_chans)
        self._sincos = sincos_pos_embed
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def _decoder_pos(self, grid, ref: torch.Tensor) -> torch.Tensor:
        # fixed sin-cos, recomputed for the actual grid, so any input size works
        return self._sincos(grid, ref.shape[-1]).to(ref)[None]

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``images`` (B, C, H, W) in [0, 1]; ``keep`` (B, K) visible patch indices or None.

        Returns ``{"pred": (B, N, ph*pw*C), "latent": (B, P + K, E)}``.
        """
        x = (images - self.pixel_mean) / self.pixel_std
        latent = self.encoder.forward_features(x, keep=keep)
        grid = self.encoder.grid_for(images.shape[2:])
        n = grid[0] * grid[1]
        p = self.encoder.num_prefix_tokens
        t = self.decoder_embed(latent)
        prefix, vis = t[:, :p], t[:, p:]
        if keep is not None:
            full = self.mask_token.to(vis.dtype).expand(t.shape[0], n, -1).clone()
            full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, vis.shape[-1]), vis)
            vis = full
        vis = vis + self._decoder_pos(grid, vis)
        h = torch.cat([prefix, vis], dim=1)
        for blk in self.decoder_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        pred = self.decoder_pred(self.decoder_norm(h))[:, p:]
        return {"pred": pred, "latent": latent}

    @torch.no_grad()
    def features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Frozen-feature readout for probing: (B, C, H, W) -> (B, E) (mean of patch tokens or cls)."""
        x = (images - self.pixel_mean) / self.pixel_std
        t = self.encoder.forward_features(x)
        p = self.encoder.num_prefix_tokens
        if pool == "cls" and p:
            return t[:, 0]
        return t[:, p:].mean(dim=1)


def build_xray_mae(cfg: XrayModelConfig | Mapping | None = None, img_size: int | None = None) -> XrayMAE:
    """Build from an :class:`~fvlm.models.xray_config.XrayModelConfig`, or a plain mapping of its keys
    (``XrayMAE.config`` included: it also carries ``img_size``; other keys are ignored).

    ``img_size`` defaults to the mapping's ``img_size``, else 224.
    """
    size = 224
    if not isinstance(cfg, XrayModelConfig):
        d = dict(cfg or {})
        size = d.pop("img_size", size)
        keys = {f.name for f in dataclasses.fields(XrayModelConfig)}
        cfg = XrayModelConfig(**{k: v for k, v in d.items() if k in keys})
    return XrayMAE(encoder=cfg.encoder, img_size=img_size if img_size is not None else size,
                   patch_size=cfg.patch_size, in_chans=cfg.in_chans, decoder_dim=cfg.decoder_dim,
                   decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
                   grad_checkpointing=cfg.grad_checkpointing, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
                   encoder_kwargs=cfg.encoder_kwargs)


def save_encoder(path: str | os.PathLike, model: XrayMAE, meta: dict | None = None,
                 state_dict: dict | None = None) -> Path:
    """Write the encoder alone (``fvlm-xray-encoder`` v1), float32 weights under ``image_encoder.``.

    ``state_dict``: the encoder's weights (its own key names) to store instead of the module's,
    e.g. fp32 master weights gathered from a ZeRO checkpoint of a bf16 run. A plain dict,
    loadable with ``torch.load(weights_only=True)`` and by
    :func:`fvlm.encoders.load_encoder_weights` (path, ``prefix="image_encoder."``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = state_dict if state_dict is not None else model.encoder.state_dict()
    spec = {"name": cfg["encoder"], "img_size": list(cfg["img_size"]), "patch_size": list(cfg["patch_size"]),
            "in_chans": cfg["in_chans"], "kwargs": dict(cfg.get("encoder_kwargs") or {}),
            "pixel_mean": cfg["pixel_mean"], "pixel_std": cfg["pixel_std"]}
    blob = {"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "encoder_spec": spec,
            "state_dict": {f"image_encoder.{k}": (v.detach().float() if v.is_floating_point() else v.detach()
                                                  ).cpu().clone() for k, v in sd.items()},
            "meta": dict(meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_encoder(path: str | os.PathLike, img_size: int | tuple[int, int] | None = None):
    """Rebuild the encoder saved by :func:`save_encoder`; returns ``(encoder, spec)``.

    ``img_size`` lets the encoder run at another resolution (position embeddings are
    recomputed or interpolated by the encoder).
    """

    path = Path(path)
    blob = read_torch_file(path, "encoder checkpoint")
    check_format(blob, ENCODER_FORMAT, ENCODER_VERSION, path)
    spec = blob["encoder_spec"]
    size = spec["img_size"] if img_size is None else (
        [img_size, img_size] if isinstance(img_size, int) else list(img_size))
    enc = create_encoder(spec["name"], img_size=tuple(size), patch_size=tuple(spec["patch_size"]),
                         in_chans=spec["in_chans"], **spec.get("kwargs", {}))
    rep = load_encoder_weights(enc, blob["state_dict"], prefix="image_encoder.")
    if rep.missing or rep.mismatched:
        raise FormatError(f"{path}: weights do not fit encoder {spec['name']}: {rep.summary()}")
    return enc, spec
