"""From dataset samples to a training batch with masks, and the model+loss module that trains on it.

:class:`XrayCollate` stacks samples and draws the masks on the CPU (in DataLoader workers):

- MAE: ``keep`` (B, K), ``mask`` (B, N) from the configured strategy;
- GMML: ``corrupted`` (B, N) blocks and ``input`` (B, 1, H, W), the corrupted images.

:class:`XrayPretrainTask` wraps :class:`~fvlm.models.xray_mae.XrayMAE` and the matching
loss of :mod:`fvlm.losses.mae`; ``task(batch)`` returns ``{"loss", "pred"}``. It is the one
module the training engine sees.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import masking

__all__ = ["XrayCollate", "XrayPretrainTask"]


class XrayCollate:
    """Collate function: ``list[sample] -> batch dict`` with masks drawn per the mask config.

    ``generator``: a ``torch.Generator`` for reproducible masks (None: the global RNG,
    which DataLoader seeds differently in every worker).
    """

    def __init__(self, mask_cfg, patch_size: int | Sequence[int], generator: torch.Generator | None = None):
        self.cfg = mask_cfg
        self.patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.generator = generator

    def __call__(self, samples: list[dict]) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "valid", "contour", "index")}
        return self.add_masks(batch)

    def add_masks(self, batch: dict) -> dict:
        c, g = self.cfg, self.generator
        img = batch["image"]
        b, _, h, w = img.shape
        grid = (h // self.patch[0], w // self.patch[1])
        n = grid[0] * grid[1]
        if c.method == "gmml":
            corrupted = masking.block_masking(b, grid, c.gmml_fraction, generator=g, min_block=c.gmml_min_block,
                                              max_block=c.gmml_max_block)
            batch["corrupted"] = corrupted
            batch["input"] = masking.corrupt(img, corrupted, self.patch, c.gmml_corruption, generator=g)
            return batch
        if c.strategy == "random":
            ms = masking.random_masking(b, n, c.ratio, generator=g)
        else:
            if c.strategy == "context":
                inside = masking.patch_regions(batch["contour"], self.patch, c.region_min_frac)
            else:
                inside = masking.box_region(grid, c.box_frac, c.box_center)[None].expand(b, -1)
            ms = masking.context_aware_masking(inside, c.ratio_inside, c.ratio_outside, generator=g)
            batch["inside"] = inside
        batch["keep"], batch["mask"] = ms.keep, ms.mask
        return batch


class XrayPretrainTask(nn.Module):
    """Model + loss: ``forward(batch) -> {"loss": scalar, "pred": (B, N, D)}``."""

    def __init__(self, model, mask_cfg):
        super().__init__()
        from ..losses.mae import GMMLLoss, MAELoss

        self.model = model
        self.method = mask_cfg.method
        if self.method == "gmml":
            self.loss = GMMLLoss(model.patch_size, norm_pix=False, l1=mask_cfg.gmml_l1)
        else:
            self.loss = MAELoss(model.patch_size, norm_pix=mask_cfg.norm_pix)

    def forward(self, batch: dict) -> dict:
        img = batch["image"]
        if self.method == "gmml":
            out = self.model(batch["input"].to(img.dtype))
            loss = self.loss(out["pred"], img, batch["corrupted"], batch.get("valid"))
        else:
            out = self.model(img, keep=batch["keep"])
            loss = self.loss(out["pred"], img, batch["mask"], batch.get("valid"))
        return {"loss": loss, "pred": out["pred"]}
