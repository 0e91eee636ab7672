"""Pure target and loss math for contrastive image-text learning (no state, no distribution).

Notation: a batch of ``N`` paired (image, text) embeddings; ``logits[i, j]`` scores image
``i`` against text ``j``. A *pair-weight matrix* ``W`` (``(N, N)``, values in ``[0, 1]``)
says how much text ``j`` is a positive for image ``i``: ``W[i, i] = 1`` always (the true
pair), ``W[i, j] > 0`` for calibrated false negatives, 0 for true negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pair_weights_identity", "combine_pair_weights", "soft_targets", "soft_infonce",
           "sigmoid_pair_loss", "masked_soft_infonce", "masked_sigmoid_pair_loss"]

#: stands in for -inf at masked logits: exp() of it is exactly 0 in float32, and unlike -inf it
#: keeps an all-masked row finite (0 * -inf would be NaN in the loss and its gradient)
_MASKED = -1.0e9


def pair_weights_identity(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The uncalibrated pair weights: only the diagonal is positive. ``(n, n)``."""
    return torch.eye(n, device=device, dtype=dtype)


def combine_pair_weights(n: int, parts, device=None, dtype=torch.float32) -> torch.Tensor:
    """Combine calibration rules: element-wise max of the identity and each rule's ``(n, n)``
    weights (so a pair one rule calls positive stays positive; weights never add above 1).
    ``None`` parts are skipped."""
    w = pair_weights_identity(n, device=device, dtype=dtype)
    for p in parts:
        if p is not None:
            w = torch.maximum(w, p.to(device=w.device, dtype=w.dtype).clamp(0.0, 1.0))
    return w


def soft_targets(pair_weights: torch.Tensor) -> torch.Tensor:
    """Row-normalise pair weights into target distributions: each row sums to 1.

    A row's probability mass is spread over its positives in proportion to their weights
    (the true pair has weight 1). ``(N, N) -> (N, N)``.
    """
    w = pair_weights.clamp_min(0)
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def soft_infonce(logits: torch.Tensor, pair_weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets.

    ``logits``: ``(N, N)`` image-to-text scores (already multiplied by the logit scale);
    ``pair_weights``: ``(N, N)`` as above. The image->text direction uses the row-normalised
    weights, the text->image direction the row-normalised transpose. Returns the mean of the
    two cross-entropies (each averaged over rows). With ``pair_weights = I`` this is CLIP's loss.
    """
    t_i2t = soft_targets(pair_weights)
    t_t2i = soft_targets(pair_weights.t())
    li = -(t_i2t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    lt = -(t_t2i * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (li + lt)


def sigmoid_pair_loss(logits: torch.Tensor, pair_weights: torch.Tensor) -> torch.Tensor:
    """SigLIP-style pairwise sigmoid loss with soft labels.

    ``logits``: ``(N, N)`` = scale * cosine + bias. Every pair is an independent binary
    problem whose label is its pair weight (1 for the true pair, the calibrated weight for a
    false negative, 0 otherwise). Summed over columns, averaged over rows, as in SigLIP.
    """
    y = pair_weights.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / logits.shape[0]


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask[:, :, None] & mask[:, None, :]


def masked_soft_infonce(logits: torch.Tensor, pair_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`soft_infonce` of several names at once, each over its own valid rows.

    ``logits``, ``pair_weights``: ``(K, N, N)``; ``mask``: ``(K, N)`` bool, the valid rows of each
    name. Entry ``k`` equals ``soft_infonce(logits[k][v][:, v], pair_weights[k][v][:, v])`` with
    ``v = mask[k]``, without selecting rows (no data-dependent shapes, so no host sync); a
    name with no valid row gives 0. Returns ``(K,)``.
    """
    pm = _pair_mask(mask)
    w = pair_weights.clamp_min(0) * pm
    tiny = torch.finfo(w.dtype).tiny
    t_i2t = w / w.sum(dim=2, keepdim=True).clamp_min(tiny)
    wt = w.transpose(1, 2)
    t_t2i = wt / wt.sum(dim=2, keepdim=True).clamp_min(tiny)
    cols = ~mask[:, None, :]
    lp_i = F.log_softmax(logits.masked_fill(cols, _MASKED), dim=2)
    lp_t = F.log_softmax(logits.transpose(1, 2).masked_fill(cols, _MASKED), dim=2)
    n = mask.sum(dim=1).clamp_min(1).to(logits.dtype)
    li = -(t_i2t * lp_i).sum(dim=(1, 2)) / n
    lt = -(t_t2i * lp_t).sum(dim=(1, 2)) / n
    return 0.5 * (li + lt)


def masked_sigmoid_pair_loss(logits: torch.Tensor, pair_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`sigmoid_pair_loss` per name over its valid rows: ``(K, N, N)``, mask ``(K, N)`` -> ``(K,)``."""
    pm = _pair_mask(mask)
    y = (pair_weights * pm).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none") * pm
    return bce.sum(dim=(1, 2)) / mask.sum(dim=1).clamp_min(1).to(logits.dtype)
