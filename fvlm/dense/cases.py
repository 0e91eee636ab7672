"""The records dense training and evaluation work on: a :class:`DenseCase` and its :class:`Finding` s.

Every case source (:mod:`fvlm.dense.data`, :mod:`fvlm.dense.demo_corpus`) builds these; they
import this module and not each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Finding", "DenseCase", "diagnosis_phrase"]


def diagnosis_phrase(diagnosis: str) -> str:
    """The prompt phrase of a diagnosis id (``liver_mass`` -> ``liver mass``)."""
    return diagnosis.replace("_", " ")


@dataclass
class Finding:
    """A localised finding: its text and its mask (bool, same grid as the image)."""
    text: str
    mask: np.ndarray
    anatomy: str = ""
    diagnosis: str = ""


@dataclass
class DenseCase:
    case_id: str
    image: np.ndarray                     # float32 [0, 1], (X, Y, Z)
    label: np.ndarray | None              # uint8 (X, Y, Z): 0 background, i + 1 = class_names[i]
    spacing_mm: tuple = (3.0, 3.0, 3.0)
    affine: np.ndarray | None = None
    findings: list[Finding] = field(default_factory=list)
    labels: dict = field(default_factory=dict)          # image-level {phrase: 1 | 0 | -1}
    sentences: list[tuple[str, str]] = field(default_factory=list)  # (anatomy id, abnormal report sentence)
