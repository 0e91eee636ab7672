"""False-negative calibration rules: which off-diagonal pairs of a batch are (soft) positives.

A rule is one small class: subclass :class:`CalibrationRule`, give it a ``name``, implement
:meth:`CalibrationRule.pair_weights`, and decorate it with :func:`register_calibration`.
It is then switched on by listing its name in the loss config (``loss.calibration``), with
keyword arguments from ``loss.calibration_options.<name>``. Rules see one anatomy (or the
global pair) at a time, over the *global* batch (all ranks), restricted to valid rows.

Rules are combined by element-wise max (:func:`fvlm.losses.targets.combine_pair_weights`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass


import torch

from ..errors import ConfigError
# status codes live in fvlm.taxonomy; re-exported here for the losses that import them from this module
from ..taxonomy import STATUS_ABNORMAL, STATUS_CODES, STATUS_NORMAL, STATUS_NOT_MENTIONED

__all__ = ["STATUS_NOT_MENTIONED", "STATUS_NORMAL", "STATUS_ABNORMAL", "STATUS_CODES", "PairContext",
           "CalibrationRule", "register_calibration", "create_calibration", "list_calibrations",
           "NormalCalibration", "DiseaseCalibration", "TextSimilarityCalibration"]



@dataclass
class PairContext:
    """What a rule may look at, for the ``N`` valid rows of one anatomy.

    status:   ``(N,)`` long, :data:`STATUS_CODES` values
    labels:   ``(N, D)`` float diagnosis labels of this anatomy (1 positive, 0 negative,
              -1 uncertain), or None when the taxonomy gives the anatomy no diagnoses
    text_ref: ``(N, F)`` reference text features (frozen or momentum text encoder), or None
    """
    name: str
    status: torch.Tensor
    labels: torch.Tensor | None = None
    text_ref: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.status.shape[0])


class CalibrationRule(abc.ABC):
    """Base class; ``pair_weights`` returns ``(N, N)`` weights in [0, 1] (diagonal ignored) or None."""

    name: str = ""

    @abc.abstractmethod
    def pair_weights(self, ctx: PairContext) -> torch.Tensor | None:
        """Soft-positive weight of every pair of rows in ``ctx`` (a subclass defines the rule)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[CalibrationRule]] = {}


def register_calibration(cls: type[CalibrationRule]) -> type[CalibrationRule]:
    """Class decorator: make a rule selectable by its ``name`` in the loss config."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def list_calibrations() -> list[str]:
    return sorted(_REGISTRY)


def create_calibration(name: str, **kwargs) -> CalibrationRule:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown calibration rule '{name}' in loss.calibration "
                          f"(known: {', '.join(list_calibrations())})")
    try:
        return _REGISTRY[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.calibration_options.{name}: {e}") from None


@register_calibration
class NormalCalibration(CalibrationRule):
    """Two rows whose anatomy is normal are positives of each other (weight ``weight``).

    ``include_not_mentioned``: also count anatomies the report does not mention as normal
    (reports usually omit normal organs).
    """

    name = "normal"

    def __init__(self, weight: float = 1.0, include_not_mentioned: bool = False):
        self.weight = float(weight)
        self.include_not_mentioned = bool(include_not_mentioned)

    def pair_weights(self, ctx: PairContext) -> torch.Tensor:
        normal = ctx.status == STATUS_NORMAL
        if self.include_not_mentioned:
            normal = normal | (ctx.status == STATUS_NOT_MENTIONED)
        n = normal.float()
        return self.weight * (n[:, None] * n[None, :])


@register_calibration
class DiseaseCalibration(CalibrationRule):
    """Two abnormal rows with the same positive diagnoses are positives.

    Rule: let ``P_i`` be the set of diagnoses labelled 1 (uncertain -1 counts as not
    positive) for row ``i``; both rows must be abnormal with non-empty ``P``. Equal sets give
    weight ``weight``. Partial overlap gives ``weight * partial * |P_i & P_j| / |P_i | P_j|``
    (Jaccard) when ``partial > 0``, else 0. Disjoint sets give 0.
    """

    name = "disease"

    def __init__(self, weight: float = 1.0, partial: float = 0.0):
        self.weight = float(weight)
        self.partial = float(partial)

    def pair_weights(self, ctx: PairContext) -> torch.Tensor | None:
        if ctx.labels is None or ctx.labels.numel() == 0:
            return None
        pos = (ctx.labels == 1).float()
        ok = (ctx.status == STATUS_ABNORMAL) & (pos.sum(dim=1) > 0)
        inter = pos @ pos.t()
        count = pos.sum(dim=1)
        union = count[:, None] + count[None, :] - inter
        jacc = inter / union.clamp_min(1)
        exact = (jacc >= 1.0 - 1e-6).float()
        w = exact + (1 - exact) * self.partial * jacc
        okf = ok.float()
        return self.weight * w * (okf[:, None] * okf[None, :])


@register_calibration
class TextSimilarityCalibration(CalibrationRule):
    """Pairs whose reference text features have cosine >= ``threshold`` are soft positives.

    Weight ``weight`` (``soft=False``) or ``weight * (cos - threshold) / (1 - threshold)``
    (``soft=True``). Needs ``text_ref``: the model's text-encoder features before projection,
    detached (from the frozen encoder; with a trained text encoder, the current one acts as a
    momentum-0 reference). Without them the rule is a no-op.
    """

    name = "text"

    def __init__(self, threshold: float = 0.95, weight: float = 1.0, soft: bool = False):
        if not -1.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [-1, 1), got {threshold}")
        self.threshold = float(threshold)
        self.weight = float(weight)
        self.soft = bool(soft)

    def pair_weights(self, ctx: PairContext) -> torch.Tensor | None:
        if ctx.text_ref is None:
            return None
        f = torch.nn.functional.normalize(ctx.text_ref.float(), dim=-1)
        cos = f @ f.t()
        hit = (cos >= self.threshold).float()
        if self.soft:
            hit = hit * ((cos - self.threshold) / (1 - self.threshold)).clamp(0, 1)
        return self.weight * hit


