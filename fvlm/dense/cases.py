"""The records dense training and evaluation work on: a :class:`DenseCase` and its :class:`Finding` s.

Every case source (:mod:`fvlm.dense.data`, :mod:`fvlm.dense.demo_corpus`) builds these; they
import this module and not each other. A volume becomes a case through the one sample path
(:func:`volume_case`, :func:`dense_input`: :mod:`fvlm.data.inputs`), never through a resize or
window of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..data.ct import SampleOptions
from ..data.inputs import build_inputs, grid_regions, sample_labels

__all__ = ["Finding", "DenseCase", "diagnosis_phrase", "hu_int16", "dense_input", "volume_case"]


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


def hu_int16(hu) -> np.ndarray:
    """HU as the sample path stores them: int16, rounded (a NIfTI's scaled floats, a resampled series)."""
    a = np.asarray(hu)
    if np.issubdtype(a.dtype, np.floating):
        a = np.rint(a)
    return np.clip(a, -32768, 32767).astype(np.int16, copy=False)


def dense_input(raw: dict, class_names: Sequence[str], window: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The device stage of a dense volume (:func:`fvlm.data.inputs.build_inputs`, on the CPU):
    ``(image float32 (X, Y, Z) windowed to [0, 1], label uint8 (X, Y, Z))`` on ``raw["shape"]``."""
    opts = SampleOptions(anatomies=list(class_names), window=(float(window[0]), float(window[1])),
                         volume_size=list(raw["shape"]), crop_size=None)
    b = build_inputs([raw], opts, opts.anatomies)
    return b["volume"][0, 0].numpy(), b["label_map"][0].numpy()


def _resampled_affine(affine, spacing, target):
    """The affine of a volume resampled from ``spacing`` to ``target`` (voxel 0 kept)."""
    if affine is None or not target:
        return affine
    a = np.array(affine, dtype=float)
    a[:3, :3] = a[:3, :3] @ np.diag(np.asarray(target, float) / np.asarray(spacing, float))
    return a


def volume_case(case_id: str, hu, ts, lut, spacing, cfg, class_names, affine=None,
                lesions=None, **kw) -> tuple[DenseCase, np.ndarray | None]:
    """A volume in memory (HU, source label ids ``ts`` mapped by ``lut``) through the sample path at
    ``data.spacing_mm``; ``lesions`` (an id map on the same grid) sampled with the labels."""
    target = list(cfg.spacing_mm) or None
    raw = grid_regions(hu_int16(hu), ts, spacing, target, lut)
    image, label = dense_input(raw, class_names, cfg.window)
    les = sample_labels(raw, lesions) if lesions is not None else None
    sp = tuple(float(s) for s in (target or spacing))
    return DenseCase(case_id, image, label, sp, _resampled_affine(affine, spacing, target), **kw), les
