"""Dense losses: Dice, cross-entropy/focal, and the mixed-supervision loss of the text-driven head.

Networks never compute losses; these modules take logits and targets:

- multi-class segmentation (softmax over ``K`` classes incl. background): logits
  ``(B, K, *S)``, target label map ``(B, *S)`` long, optional ``ignore_index``;
- per-prompt segmentation (sigmoid, prompts may overlap): logits ``(B, K, *S)``, target
  ``(B, K, *S)`` in ``{0, 1}`` and a voxel weight of the same shape (0 = unknown there).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SoftmaxDiceLoss", "SoftmaxFocalLoss", "DiceCELoss", "sigmoid_dice_loss", "sigmoid_focal_loss",
           "MixedSupervisionLoss", "pooled_logit"]


def _one_hot(target: torch.Tensor, k: int, ignore_index: int | None):
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    oh = F.one_hot(t.long(), k).movedim(-1, 1).to(torch.float32)
    return oh, valid


class SoftmaxDiceLoss(nn.Module):
    """Soft Dice over softmax probabilities, averaged over foreground classes present in the batch.

    Computed over the whole batch (sums over B and space) so that a class absent from one
    sample is not pushed towards an undefined score; classes absent from the whole batch
    and from the prediction contribute ``~0`` through the smoothing term.
    """

    def __init__(self, include_background: bool = False, smooth: float = 1e-5, ignore_index: int | None = None):
        super().__init__()
        self.include_background = include_background
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        prob = logits.float().softmax(1)
        oh, valid = _one_hot(target, k, self.ignore_index)
        v = valid.unsqueeze(1).to(prob.dtype)
        dims = [0] + list(range(2, logits.ndim))
        inter = (prob * oh * v).sum(dims)
        denom = (prob * v).sum(dims) + (oh * v).sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        start = 0 if self.include_background else 1
        present = (oh * v).sum(dims)[start:] > 0
        loss = 1 - dice[start:]
        # classes absent from the batch still penalise false positives, with less weight
        w = torch.where(present, torch.ones_like(loss), torch.full_like(loss, 0.1))
        return (loss * w).sum() / w.sum()


class SoftmaxFocalLoss(nn.Module):
    """Multi-class focal loss ``-(1 - p_t)^gamma log p_t`` (``gamma = 0`` is cross-entropy)."""

    def __init__(self, gamma: float = 2.0, ignore_index: int | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ii = -100 if self.ignore_index is None else self.ignore_index
        logp = F.log_softmax(logits.float(), dim=1)
        ce = F.nll_loss(logp, target.long(), weight=self.weight, ignore_index=ii, reduction="none")
        valid = target != ii
        if self.gamma:
            t = torch.where(valid, target, torch.zeros_like(target)).long()
            pt = logp.gather(1, t.unsqueeze(1)).squeeze(1).exp()
            ce = ce * (1 - pt).pow(self.gamma)
        return ce[valid].mean() if valid.any() else logits.sum() * 0.0


class DiceCELoss(nn.Module):
    """``dice_weight * Dice + ce_weight * (CE or focal)`` for softmax segmentation.

    ``ce_class_weight``: ``(K,)`` per-class weights of the cross-entropy/focal term (None = equal).
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, focal_gamma: float = 0.0,
                 ignore_index: int | None = None, ce_class_weight: torch.Tensor | None = None):
        super().__init__()
        self.dice = SoftmaxDiceLoss(ignore_index=ignore_index)
        self.ce = SoftmaxFocalLoss(gamma=focal_gamma, ignore_index=ignore_index, weight=ce_class_weight)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)


def sigmoid_focal_loss(logits, target, weight=None, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Weighted mean of the binary focal loss; ``weight`` (same shape) 0 marks unknown voxels."""
    logits = logits.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if gamma:
        p = torch.sigmoid(logits)
        pt = p * target + (1 - p) * (1 - target)
        ce = ce * (1 - pt).pow(gamma)
    if alpha is not None and alpha >= 0:
        ce = ce * (alpha * target + (1 - alpha) * (1 - target))
    if weight is None:
        return ce.mean()
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def sigmoid_dice_loss(logits, target, rows: torch.Tensor | None = None, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice per (sample, prompt) over space, averaged over the ``rows`` (B, K) bool that have full masks."""
    p = torch.sigmoid(logits.float()).flatten(2)
    t = target.float().flatten(2)
    dice = (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    loss = 1 - dice
    if rows is None:
        return loss.mean()
    rows = rows.to(loss.dtype)
    return (loss * rows).sum() / rows.sum().clamp_min(1.0)


def pooled_logit(logits: torch.Tensor, beta: float = 5.0) -> torch.Tensor:
    """Image-level score per prompt: a smooth maximum (log-mean-exp with temperature ``beta``) over space.

    ``(B, K, *S)`` -> ``(B, K)``. Large ``beta`` approaches the max, small ``beta`` the mean;
    an image-level label then says "somewhere" without saying where.
    """
    x = logits.float().flatten(2)
    n = x.shape[-1]
    return (torch.logsumexp(beta * x, dim=-1) - torch.log(torch.tensor(float(n)))) / beta


class MixedSupervisionLoss(nn.Module):
    """Mixed supervision for prompt-conditioned masks.

    Args to ``forward``:
        logits: ``(B, K, *S)`` one map per prompt.
        mask: ``(B, K, *S)`` voxel targets in {0, 1}.
        mask_weight: ``(B, K, *S)``; 1 where ``mask`` is known (a segmentation mask, or
            "not outside the named anatomy" for a report sentence), 0 where unknown.
        full_mask: ``(B, K)`` bool, the rows whose mask is a complete segmentation. Dice applies
            to those with a non-empty mask: on an empty mask soft Dice is ~1 whatever the
            prediction (its gradient vanishes once a few voxels are on), so empty rows are
            left to the voxel loss and the image-level label.
        image_label: ``(B, K)`` in {1, 0, -1}: the prompt is present / absent in the image /
            unknown (report-derived labels without a mask).
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 1.0, label_weight: float = 0.2,
                 focal_gamma: float = 2.0, focal_alpha: float = 0.25, pool_beta: float = 5.0):
        super().__init__()
        self.dice_weight = dice_weight
        self.focal_weight = focal_weight
        self.label_weight = label_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.pool_beta = pool_beta

    def forward(self, logits, mask, mask_weight, full_mask, image_label) -> dict:
        out = {}
        total = logits.sum() * 0.0
        if self.focal_weight and mask_weight.sum() > 0:
            out["focal"] = sigmoid_focal_loss(logits, mask.float(), mask_weight.float(), self.focal_gamma,
                                              self.focal_alpha)
            total = total + self.focal_weight * out["focal"]
        dice_rows = full_mask & (mask.flatten(2).sum(-1) > 0)
        if self.dice_weight and dice_rows.any():
            out["dice"] = sigmoid_dice_loss(logits, mask, dice_rows)
            total = total + self.dice_weight * out["dice"]
        known = image_label >= 0
        if self.label_weight and known.any():
            s = pooled_logit(logits, self.pool_beta)
            out["label"] = F.binary_cross_entropy_with_logits(s[known], image_label[known].float())
            total = total + self.label_weight * out["label"]
        out["loss"] = total
        return out
