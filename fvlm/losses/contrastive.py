"""The fine-grained (per-anatomy + global) contrastive loss module.

Inputs (from the model's forward and the batch; see :meth:`FineGrainedContrastiveLoss.forward`):
per name (each anatomy id, and ``"global"``) L2-normalised image and text embeddings ``(B, E)``
and a validity mask ``(B,)`` (or all of it stacked, ``(B, K, E)``). The loss gathers the global
batch across ranks once per step, every name and field packed into one tensor
(:mod:`fvlm.losses.gather`; open_clip gathers once per step too, where this loss once ran four
gathers and a host sync per name), then, for all names at once, masks the invalid rows (an
anatomy absent from the scan or with no text contributes nothing), builds calibrated pair
weights and applies symmetric soft-target InfoNCE (or the sigmoid loss). Counts stay on the
device: nothing here waits for the host.

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
from ..errors import ConfigError
from .calibration import STATUS_NOT_MENTIONED, CalibrationRule, PairContext, create_calibration
from .classification import AuxClassificationLoss, WithAuxLoss
from .gather import gather_nograd, gather_with_grad
from .targets import (combine_pair_weights, masked_sigmoid_pair_loss, masked_soft_infonce, sigmoid_pair_loss,
                      soft_infonce)

__all__ = ["LossConfig", "FineGrainedContrastiveLoss", "build_loss"]

GLOBAL = "global"


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
    aux_weight: float = opt(0.0, "weight of the auxiliary per-anatomy classification loss (BCE of the model's "
                            "head on the silver labels, fvlm.losses.classification; 0 = off)")


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
        ``logit_bias`` (sigmoid loss) and ``text_ref``: name -> ``(B, F)``. The same as stacked
        tensors in ``out["stacked"]`` (``names``, ``image``/``text`` ``(B, K, E)``, ``valid``
        ``(B, K)``, ``text_ref`` ``(B, K, F)``), which the model provides, are used when present.
        ``batch``: optional ``status (B, A)`` long, ``global_status (B,)`` long,
        ``labels (B, D)`` float.

        One all-gather per step, of everything packed into one ``(B, P)`` tensor, and no host
        sync: every name's loss is computed over the whole gathered batch with its invalid rows
        masked (:func:`masked_soft_infonce`), equal to the loss over its valid rows alone.

        Returns ``(loss, logs)``; logs hold detached per-name losses (``loss/<name>``; 0 when the
        name has fewer than ``min_valid`` valid rows and does not count) and valid counts
        (``n/<name>``), all on the device.
        """
        st = _stacked(out)
        names = [n for n in st["names"] if (self.cfg.global_weight if n == GLOBAL else self.cfg.anatomy_weight)]
        scale = out["logit_scale"]
        bias = out.get("logit_bias")
        dev = st["image"].device
        anchor = st["image"].sum() * 0 + st["text"].sum() * 0   # the graph reaches the model even if nothing counts
        g = self._gather_step(st, batch)
        logs: dict[str, torch.Tensor] = {}
        if names:
            ks = [st["names"].index(n) for n in names]
            img, txt, valid = g["image"][:, ks], g["text"][:, ks], g["valid"][:, ks].t()      # (N, K', E), (K', N)
            logits = scale * torch.einsum("nke,mke->knm", img.float(), txt.float())
            if self.cfg.kind == "sigmoid":
                if bias is not None:
                    logits = logits + bias
            pw = torch.stack([self._pair_weights_for(n, k, g) for n, k in zip(names, ks)])
            terms = (masked_sigmoid_pair_loss(logits, pw, valid) if self.cfg.kind == "sigmoid"
                     else masked_soft_infonce(logits, pw, valid))
            count = valid.sum(dim=1)                                                          # (K',)
            counted = count >= self.cfg.min_valid
            terms = torch.where(counted, terms, torch.zeros_like(terms))
            for i, n in enumerate(names):
                logs[f"n/{n}"] = count[i].float()
                logs[f"loss/{n}"] = terms[i].detach()
            is_anat = torch.tensor([n != GLOBAL for n in names], device=dev)
            total = anchor + self._weighted_total(terms, counted, count, is_anat, logs)
        else:
            total = anchor
        logs["logit_scale"] = scale.detach().float()
        logs["temperature"] = (1.0 / scale.detach().float())
        return total, logs

    def _weighted_total(self, terms, counted, count, is_anat, logs) -> torch.Tensor:
        """``anatomy_weight * A + global_weight * G`` from per-name ``terms (K,)`` (see the module docstring)."""
        cfg = self.cfg
        w = counted & is_anat
        w = w.float() if cfg.anatomy_weighting == "equal" else w.float() * count.float()
        a = (terms * w).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)   # 0 when no anatomy counts
        logs["loss/anatomy_mean"] = a.detach()
        glob = (terms * (~is_anat).float()).sum()                               # 0 without a counted global
        return cfg.anatomy_weight * a + cfg.global_weight * glob

    def _gather_step(self, st: dict, batch: dict) -> dict:
        """All ranks' rows of everything the loss needs, in one all-gather (``(W * B, ...)``)."""
        img, txt, valid = st["image"], st["text"], st["valid"]
        B, K, E = img.shape
        dev = img.device
        ref = st.get("text_ref")
        fields = {"image": img.float().reshape(B, -1), "text": txt.float().reshape(B, -1),
                  "valid": valid.to(dev, torch.float32)}
        if ref is not None:
            fields["text_ref"] = ref.detach().float().reshape(B, -1)
        for key in ("status", "global_status", "labels"):
            v = batch.get(key)
            if v is not None:    # status codes and labels (-1, 0, 1) are exact in float32
                fields[key] = v.detach().to(dev, torch.float32).reshape(B, -1)
        sizes = [f.shape[1] for f in fields.values()]
        packed = torch.cat(list(fields.values()), dim=1)
        if self.cfg.gather:
            packed = gather_with_grad(packed)   # only image/text columns carry gradient
        parts = dict(zip(fields, torch.split(packed, sizes, dim=1)))
        N = packed.shape[0]
        out = {"image": parts["image"].view(N, K, E), "text": parts["text"].view(N, K, E),
               "valid": parts["valid"] > 0.5}
        if "text_ref" in parts:
            out["text_ref"] = parts["text_ref"].view(N, K, -1)
            out["has_ref"] = st["has_ref"]
        for key, dtype in (("status", torch.long), ("global_status", torch.long), ("labels", torch.float32)):
            if key in parts:
                out[key] = parts[key].round().to(dtype) if dtype == torch.long else parts[key]
        if "global_status" in out:
            out["global_status"] = out["global_status"][:, 0]
        return out

    def _pair_weights_for(self, name: str, k: int, g: dict) -> torch.Tensor:
        """Calibrated ``(N, N)`` pair weights of one name over all gathered rows (rules are per pair,
        so restricting them to the valid rows later gives what the rows alone would)."""
        N = g["valid"].shape[0]
        dev = g["valid"].device
        is_global = name == GLOBAL
        status = g.get("status")
        if is_global and "global_status" in g:
            st = g["global_status"]
        elif not is_global and status is not None and name in self.anatomies:
            st = status[:, self.anatomies.index(name)]
        else:
            st = torch.full((N,), STATUS_NOT_MENTIONED, dtype=torch.long, device=dev)
        lab = self._labels_for(name, g.get("labels"))
        ref = g["text_ref"][:, k] if "text_ref" in g and g["has_ref"][k] else None
        ctx = PairContext(name=name, status=st, labels=lab, text_ref=ref)
        return self.pair_weights(ctx, calibrate=(not is_global) or self.cfg.calibrate_global)


def _stacked(out: dict) -> dict:
    """``out["stacked"]`` as given, or built from the per-name dicts (``names`` in their order)."""
    if "stacked" in out:
        st = dict(out["stacked"])
        st.setdefault("has_ref", [st.get("text_ref") is not None] * len(st["names"]))
        return st
    names = list(out["image"])
    img = torch.stack([out["image"][n] for n in names], dim=1)
    st = {"names": names, "image": img, "text": torch.stack([out["text"][n] for n in names], dim=1),
          "valid": torch.stack([out["valid"][n].to(img.device).bool() for n in names], dim=1)}
    refs = out.get("text_ref") or {}
    have = [n in refs and refs[n] is not None for n in names]
    if any(have):
        f = next(refs[n] for n, h in zip(names, have) if h)
        zero = f.new_zeros(f.shape)
        st["text_ref"] = torch.stack([refs[n] if h else zero for n, h in zip(names, have)], dim=1)
    st["has_ref"] = have
    return st


def build_loss(cfg: LossConfig, anatomies: list[str], label_groups: dict[str, list[int]] | None = None):
    """The loss module for a config (the registry of loss kinds is :class:`LossConfig.kind`); with
    ``aux_weight > 0`` the contrastive loss plus the weighted auxiliary classification loss."""
    main = FineGrainedContrastiveLoss(cfg, anatomies, label_groups)
    if cfg.aux_weight < 0:
        raise ConfigError(f"loss.aux_weight must be >= 0, got {cfg.aux_weight}")
    if not cfg.aux_weight or not anatomies:    # a global-only model has no anatomy to classify
        return main

    return WithAuxLoss(main, AuxClassificationLoss(anatomies, label_groups or {}), cfg.aux_weight)
