"""Per-case helpers shared by the write path (:mod:`preprocess.writer`, ``case_record``) and
its callers: effective crop shapes, a diagonal affine from axis codes, the stored HU histogram,
and the one home of the TotalSegmentator entry points (``ts_available``,
``run_totalsegmentator``, ``ts_version``; tests and users replace them here).

The v1 path that built every crop at write time (``process_case``) is gone: shards v2 store the
resampled volume and label map once and crops are cut when read.
"""
from __future__ import annotations

import numpy as np

from fvlm.anatomy import AnatomySet

from .config import PreprocessConfig
from .masks import run_totalsegmentator, ts_available, ts_version

__all__ = ["crop_shapes", "HU_HIST_EDGES", "affine_from_axcodes", "ts_available", "run_totalsegmentator",
           "ts_version"]

#: HU histogram bins stored per case (for summary.json): -1100..1500 in 50 HU steps
HU_HIST_EDGES = np.arange(-1100, 1501, 50)


def crop_shapes(cfg: PreprocessConfig, aset: AnatomySet) -> dict:
    """Effective crop shape per anatomy: the set's, then ``crop.shape_all``, then ``crop.shapes``."""
    out = {}
    for a in aset:
        s = list(a.crop_shape)
        if cfg.crop.shape_all:
            s = list(cfg.crop.shape_all)
        if a.id in cfg.crop.shapes:
            s = list(cfg.crop.shapes[a.id])
        out[a.id] = tuple(int(x) for x in s)
    return out


def affine_from_axcodes(axcodes: str, spacing) -> np.ndarray:
    """A diagonal-orientation affine for voxel axis codes (e.g. ``LPS``) and spacing (mm)."""
    import nibabel as nib

    ornt = nib.orientations.axcodes2ornt(tuple(axcodes.upper()))
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, (ax, flip) in enumerate(ornt):
        aff[int(ax), i] = float(flip) * float(spacing[i])
    return aff


def _hist(arr: np.ndarray) -> list[int]:
    s = arr[::4, ::4, ::4]
    h, _ = np.histogram(s, bins=HU_HIST_EDGES)
    return [int(x) for x in h]
