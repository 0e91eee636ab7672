"""Reconstruction losses for masked image modelling on radiographs (MAE and GMML).

Both take the decoder's per-patch predictions ``(B, N, p*p*C)`` in the layout of
:func:`fvlm.encoders.patchify` and the clean images ``(B, C, H, W)``, and average only
over the patches (MAE) or pixels (GMML) that were hidden or corrupted; everything else
contributes neither to the value nor to the gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..encoders import patchify
from ..encoders.vit import patch_regions

__all__ = ["patch_targets", "masked_patch_loss", "corrupted_pixel_loss", "MAELoss", "GMMLLoss"]


def patch_targets(images: torch.Tensor, patch_size: Sequence[int], norm_pix: bool = True,
                  eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) targets; with ``norm_pix`` each patch is standardised."""
    t = patchify(images, patch_size)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True, unbiased=False)
        t = (t - mean) / (var + eps).sqrt()
    return t


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per patch, averaged over the patches where ``mask`` is True.

    ``pred``/``target``: (B, N, D); ``mask``: (B, N) bool; ``weight``: optional (B, N) float
    (e.g. 0 on padding). Returns a scalar (0 with a zero gradient when nothing is masked).
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)
    w = mask.to(per_patch.dtype)
    if weight is not None:
        w = w * weight.to(per_patch.dtype)
    return (per_patch * w).sum() / w.sum().clamp_min(1.0)


def corrupted_pixel_loss(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor,
                         l1: bool = True) -> torch.Tensor:
    """L1 (or squared) error averaged over the pixels where ``pixel_mask`` (same shape, 0/1) is set."""
    err = (pred - target).abs() if l1 else (pred - target).pow(2)
    w = pixel_mask.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)


class _PatchLoss(nn.Module):
    """A loss against the patch targets of the clean images (:func:`patch_targets`)."""

    def __init__(self, patch_size: Sequence[int], norm_pix: bool):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.norm_pix = norm_pix

    def targets(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` targets of ``images``, which must match ``pred``'s shape (else ValueError)."""
        target = patch_targets(images, self.patch_size, self.norm_pix)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} does not match the patch targets {tuple(target.shape)}")
        return target


class MAELoss(_PatchLoss):
    """MAE: normalised-pixel MSE on the hidden patches only.

    ``forward(pred (B, N, D), images (B, C, H, W), mask (B, N) bool, valid=None)``;
    ``valid`` (B, H, W) bool drops patches that are mostly padding from the average.
    """

    def __init__(self, patch_size: Sequence[int], norm_pix: bool = True, min_valid: float = 0.5):
        super().__init__(patch_size, norm_pix)
        self.min_valid = min_valid

    def forward(self, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        target = self.targets(pred, images)
        weight = None
        if valid is not None:
            weight = patch_regions(valid, self.patch_size, self.min_valid).float()
        return masked_patch_loss(pred, target, mask, weight)


class GMMLLoss(_PatchLoss):
    """GMML: reconstruction error on the corrupted pixels only (L1 by default, as in GMML).

    ``forward(pred (B, N, D), images (B, C, H, W), corrupted (B, N) bool, valid=None)``;
    the target is the clean image (per-patch normalised with ``norm_pix``); ``valid``
    (B, H, W) bool removes padding pixels.
    """

    def __init__(self, patch_size: Sequence[int], norm_pix: bool = False, l1: bool = True):
        super().__init__(patch_size, norm_pix)
        self.l1 = l1

    def forward(self, pred: torch.Tensor, images: torch.Tensor, corrupted: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        target = self.targets(pred, images)
        pix = corrupted[..., None].expand_as(target)
        if valid is not None:
            vpix = patchify(valid[:, None].to(target.dtype).expand(-1, images.shape[1], -1, -1), self.patch_size)
            pix = pix & (vpix > 0.5)
        return corrupted_pixel_loss(pred, target, pix, self.l1)
