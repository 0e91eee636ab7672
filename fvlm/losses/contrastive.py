"""The fine-grained (per-anatomy + global) contrastive loss module.

Inputs (from the model's forward and the batch; see :meth:`FineGrainedContrastiveLoss.forward`):
per name (each anatomy id, and ``"global"``) L2-normalised image and text embeddings ``(B, E)``
and a validity mask ``(B,)``. For each name the loss gathers the global batch across ranks
(:mod:`fvlm.losses.gather`), keeps the valid rows (an anatomy absent from the scan or with no
text contributes nothing), builds calibrated pair weights and applies symmetric soft-target
InfoNCE (or the sigmoid loss).

Weighting (documented in FORMATS/config help): ``total = anatomy_weight * A + global_weight * G``
where ``G`` is the global pair's loss and ``A`` the average of the per-anatomy losses over
anatomies with at least ``min_valid`` valid rows in the global batch: equal weights
(``anatomy_weighting: equal``) or weights proportional to their valid-row counts
(``count``). An anatomy with fewer valid rows, or a term with weight 0, is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..config import opt
from .calibration import STATUS_NOT_MENTIONED, CalibrationRule, PairContext, create_calibration
from .gather import gather_nograd, gather_with_grad
from .targets import combine_pair_weights, sigmoid_pair_loss, soft_infonce

__all__ = ["LossConfig", "FineGrainedContrastiveLoss", "build_loss"]


@dataclass
class LossConfig:
    kind: Literal["infonce", "sigmoid"] = opt("infonce", "softmax InfoNCE (CLIP) or pairwise sigmoid (SigLIP)")
    calibration: list[str] = opt(["normal"], "false-negative calibration rules, combined by max "
                                 "(normal, disease, text; [] = plain CLIP targets)")
    calibration_options: dict[str, dict[str, Any]] = opt(
        {}, "keyword arguments per rule, e.g. {text: {threshold: 0.95}, disease: {partial: 0.5}}")
    calibrate_global: bool = opt(True, "apply the calibration rules to the global pair too "
                                 "(status normal = no abnormal anatomy and no positive label)")
    anatomy_weighting: Literal["equal", "count"] = opt(
        "equal", "average of per-anatomy losses: equal weights, or proportional to valid rows")
    anatomy_weight: float = opt(1.0, "weight of the averaged per-anatomy loss in the total")
    global_weight: float = opt(1.0, "weight of the global (whole volume <-> whole report) loss")
    min_valid: int = opt(2, "an anatomy needs this many valid rows in the global batch to count")
    gather: bool = opt(True, "use negatives from all ranks (all-gather)")


def _rules(cfg: LossConfig) -> list[CalibrationRule]:
    return [create_calibration(n, **dict(cfg.calibration_options.get(n, {}))) for n in cfg.calibration]


class FineGrainedContrastiveLoss(nn.Module):
    """Per-anatomy and global contrastive loss with false-negative calibration.

    Args:
        cfg: :class:`LossConfig`.
        anatomies: anatomy ids in the column order of ``batch["status"]``.
        label_groups: anatomy id (or ``"global"``) -> diagnosis columns of ``batch["labels"]``
            used by the disease-aware rule; ``"global"`` defaults to all columns.
    """

    def __init__(self, cfg: LossConfig, anatomies: list[str], label_groups: dict[str, list[int]] | None = None):
        super().__init__()
        self.cfg = cfg
        self.anatomies = list(anatomies)
        self.label_groups = dict(label_groups or {})
        self.rules = _rules(cfg)

    # ------------------------------------------------------------------ pieces
    def _gather(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        if not self.cfg.gather:
            return x
        return gather_with_grad(x) if grad else gather_nograd(x)

    def _labels_for(self, name: str, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        if name in self.label_groups:
            cols = self.label_groups[name]
            return labels[:, cols] if cols else None
        return labels if name == "global" else None

    def pair_loss(self, img: torch.Tensor, txt: torch.Tensor, pair_w: torch.Tensor,
                  logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one name over its ``N`` valid rows: ``img, txt (N, E)``, ``pair_w (N, N)``."""
        logits = logit_scale * (img.float() @ txt.float().t())
        if self.cfg.kind == "sigmoid":
            if logit_bias is not None:
                logits = logits + logit_bias
            return sigmoid_pair_loss(logits, pair_w)
        return soft_infonce(logits, pair_w)

    def pair_weights(self, ctx: PairContext, calibrate: bool = True) -> torch.Tensor:
        parts = [r.pair_weights(ctx) for r in self.rules] if calibrate else []
        return combine_pair_weights(ctx.n, parts, device=ctx.status.device)

    # ------------------------------------------------------------------ forward
    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the total loss.

        ``out``: ``image`` / ``text``: name -> ``(B, E)`` L2-normalised; ``valid``: name -> ``(B,)``
        bool; ``logit_scale``: scalar (already exponentiated and clamped); optional
        ``logit_bias`` (sigmoid loss) and ``text_ref``: name -> ``(B, F)``.
        ``batch``: optional ``status (B, A)`` long, ``global_status (B,)`` long,
        ``labels (B, D)`` float.

        Returns ``(loss, logs)``; logs hold detached per-name losses (``loss/<name>``) and
        valid counts (``n/<name>``).
        """
        scale = out["logit_scale"]
        bias = out.get("logit_bias")
        status = batch.get("status")
        gstatus = batch.get("global_status")
        labels = batch.get("labels")
        if status is not None:
            status = self._gather(status, False)
        if gstatus is not None:
            gstatus = self._gather(gstatus, False)
        if labels is not None:
            labels = self._gather(labels.float(), False)
        text_ref = out.get("text_ref") or {}

        logs: dict[str, torch.Tensor] = {}
        anat_terms, anat_w = [], []
        global_term = None
        anchor = None
        for name, img in out["image"].items():
            txt = out["text"][name]
            anchor = img.sum() * 0 + txt.sum() * 0 if anchor is None else anchor
            is_global = name == "global"
            w_term = self.cfg.global_weight if is_global else self.cfg.anatomy_weight
            if w_term == 0:
                continue
            valid = self._gather(out["valid"][name], False).bool()
            g_img = self._gather(img, True)
            g_txt = self._gather(txt, True)
            n_valid = int(valid.sum())
            logs[f"n/{name}"] = torch.tensor(float(n_valid))
            if n_valid < self.cfg.min_valid:
                continue
            idx = valid.nonzero(as_tuple=True)[0]
            if is_global:
                st = gstatus if gstatus is not None else torch.full((valid.shape[0],), STATUS_NOT_MENTIONED)
            elif status is not None and name in self.anatomies:
                st = status[:, self.anatomies.index(name)]
            else:
                st = torch.full((valid.shape[0],), STATUS_NOT_MENTIONED)
            st = st.to(img.device)[idx]
            lab = self._labels_for(name, labels)
            ref = text_ref.get(name)
            ctx = PairContext(name=name, status=st, labels=None if lab is None else lab[idx].to(img.device),
                              text_ref=None if ref is None else self._gather(ref, False)[idx])
            pw = self.pair_weights(ctx, calibrate=(not is_global) or self.cfg.calibrate_global)
            term = self.pair_loss(g_img[idx], g_txt[idx], pw, scale, bias)
            logs[f"loss/{name}"] = term.detach()
            if is_global:
                global_term = term
            else:
                anat_terms.append(term)
                anat_w.append(1.0 if self.cfg.anatomy_weighting == "equal" else float(n_valid))

        total = anchor if anchor is not None else torch.zeros(())
        if anat_terms:
            w = torch.tensor(anat_w, device=anat_terms[0].device)
            a = (torch.stack(anat_terms) * (w / w.sum())).sum()
            logs["loss/anatomy_mean"] = a.detach()
            total = total + self.cfg.anatomy_weight * a
        if global_term is not None:
            total = total + self.cfg.global_weight * global_term
        logs["logit_scale"] = scale.detach().float()
        logs["temperature"] = (1.0 / scale.detach().float())
        return total, logs


def build_loss(cfg: LossConfig, anatomies: list[str], label_groups: dict[str, list[int]] | None = None):
    """The loss module for a config (the registry of loss kinds is :class:`LossConfig.kind`)."""
    return FineGrainedContrastiveLoss(cfg, anatomies, label_groups)
