"""Auxiliary per-anatomy classification on the report labeler's silver labels (label supervision).

GreenRFM-style: next to the contrastive loss, each anatomy embedding predicts the diagnoses of
its anatomy with a binary cross-entropy. The model owns the head and outputs its logits
(``out["aux"]``, see :meth:`fvlm.models.fvlm.FVLM.forward`); this module only computes the loss.
Zero-shot scoring never uses the head: it compares image and text embeddings.

Which logits count: anatomy ``a``'s row predicts only the diagnosis columns of that anatomy
(``label_groups[a]``), only where the anatomy is in the scan, and only where the silver label
is known (1 or 0; -1 = uncertain or not mentioned is masked out).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FvlmError

__all__ = ["group_mask", "masked_group_bce", "AuxClassificationLoss", "WithAuxLoss"]


def group_mask(anatomies: list[str], label_groups: dict[str, list[int]], n_labels: int) -> torch.Tensor:
    """``(A, D)`` bool: column ``d`` is a diagnosis of anatomy ``a`` (``"global"`` is ignored)."""
    m = torch.zeros(len(anatomies), n_labels, dtype=torch.bool)
    for i, a in enumerate(anatomies):
        cols = [c for c in label_groups.get(a, []) if c < n_labels]
        m[i, cols] = True
    return m


def masked_group_bce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                     groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE over the counted (case, anatomy, diagnosis) cells, and their number.

    Args:
        logits: ``(B, A, D)`` per-anatomy logits for every label column.
        labels: ``(B, D)`` silver labels 1 / 0 / -1 (-1 = unknown, masked out).
        valid: ``(B, A)`` bool, the anatomy is in the scan.
        groups: ``(A, D)`` bool, column ``d`` belongs to anatomy ``a`` (:func:`group_mask`).
    Returns:
        ``(loss, count)``: scalar mean over counted cells (0, still in the graph, when none
        counts) and the count (float scalar).
    """
    if logits.shape[:2] != valid.shape or logits.shape[2] != labels.shape[1] or groups.shape != logits.shape[1:]:
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"valid {tuple(valid.shape)}, groups {tuple(groups.shape)}")
    lab = labels.to(logits.dtype).unsqueeze(1).expand_as(logits)
    w = (valid.bool().unsqueeze(-1) & groups.to(logits.device).unsqueeze(0) & (lab >= 0)).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, lab.clamp_min(0), reduction="none")
    n = w.sum()
    return (bce * w).sum() / n.clamp_min(1), n


class AuxClassificationLoss(nn.Module):
    """BCE of the model's per-anatomy logits (``out["aux"]``) against ``batch["labels"]``.

    Args:
        anatomies: anatomy ids in the model's row order.
        label_groups: anatomy id -> the columns of ``batch["labels"]`` that are its diagnoses.
    """

    def __init__(self, anatomies: list[str], label_groups: dict[str, list[int]]):
        super().__init__()
        self.anatomies = list(anatomies)
        self.label_groups = dict(label_groups)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux = out.get("aux")
        if aux is None:
            raise FvlmError("loss.aux_weight > 0 but the model outputs no classification logits "
                            "(set model.aux_classes to the number of label columns)")
        if "labels" not in batch:
            raise FvlmError("loss.aux_weight > 0 needs silver labels in the batch (batch['labels'])")
        logits = aux["logits"]
        labels = batch["labels"].to(logits.device)
        groups = group_mask(self.anatomies, self.label_groups, labels.shape[1])
        loss, n = masked_group_bce(logits, labels, aux["valid"], groups)
        return loss, {"loss/aux": loss.detach(), "n/aux_labels": n.detach()}


class WithAuxLoss(nn.Module):
    """``main + weight * aux``; the logs of both (``loss/main`` is the main loss alone)."""

    def __init__(self, main: nn.Module, aux: nn.Module, weight: float):
        super().__init__()
        self.main, self.aux, self.weight = main, aux, float(weight)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m, logs = self.main(out, batch)
        a, alogs = self.aux(out, batch)
        return m + self.weight * a, {**logs, **alogs, "loss/main": m.detach()}
