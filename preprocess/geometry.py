"""Voxel geometry: affine checks, canonical orientation, separable resampling, windows.

The resampler is fvlm's own fast path (numpy only) (tested against MONAI's ``Spacingd`` in
``tests/test_preprocess_geometry.py``): separable gathers from ``fvlm.data.sampling``, the
module the shard reader cuts crops with, so preprocessing and reading agree voxel for voxel. The grid follows MONAI's
``Spacing`` convention: voxel 0 keeps its world position, output size
``round((n - 1) * s_in / s_out + 1)``, positions past the last voxel take its value.
"""
from __future__ import annotations

import math

import numpy as np

from fvlm.data.sampling import sample_axes

from .errors import CaseError

__all__ = ["spacing_of", "oblique_angle_deg", "check_affine", "to_canonical", "resampled_shape",
           "sample_axes", "resample", "window_positions"]


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each array axis: column norms of the 3x3 part."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def oblique_angle_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between an array axis and the nearest world axis."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    cols = m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-12)
    cosines = np.clip(np.abs(cols).max(axis=0), 0.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def check_affine(affine: np.ndarray, max_oblique_deg: float) -> tuple[np.ndarray, float]:
    """Validate a voxel->world affine; return ``(spacing_mm, oblique_deg)`` or raise CaseError."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise CaseError("geometry", f"affine is not a finite 4x4 matrix: {a.tolist()}")
    sp = spacing_of(a)
    if (sp < 1e-3).any() or (sp > 100).any():
        raise CaseError("geometry", f"degenerate voxel spacing {np.round(sp, 4).tolist()} mm")
    det = abs(np.linalg.det(a[:3, :3]))
    if det < 1e-6 * float(np.prod(sp)):
        raise CaseError("geometry", "degenerate affine: the voxel axes are (nearly) parallel")
    ang = oblique_angle_deg(a)
    if ang > max_oblique_deg:
        raise CaseError("geometry", f"oblique volume: an axis is {ang:.1f} deg from the nearest world axis "
                                    f"(max_oblique_deg = {max_oblique_deg}); reformat it axially first")
    return sp, ang


def to_canonical(arr: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray, str]:
    """Reorient ``arr`` (3D) to ``axcodes`` by axis permutation and flips (no interpolation).

    Returns ``(view, new_affine, source_axcodes)``. The view shares memory with ``arr``;
    a small obliquity stays in the affine (snapped later: the grid is treated as axis-aligned).
    """
    import nibabel as nib

    src = nib.orientations.io_orientation(affine)
    src_codes = "".join(nib.orientations.ornt2axcodes(src))
    dst = nib.orientations.axcodes2ornt(tuple(axcodes))
    tr = nib.orientations.ornt_transform(src, dst)
    out = nib.orientations.apply_orientation(arr, tr)
    new_aff = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(tr, arr.shape)
    return out, new_aff, src_codes


def resampled_shape(shape, spacing_in, spacing_out) -> tuple[int, ...]:
    """MONAI ``Spacing`` output size: ``round((n - 1) * s_in / s_out + 1)`` per axis."""
    return tuple(max(1, int(np.round((n - 1) * si / so + 1.0)))
                 for n, si, so in zip(shape, spacing_in, spacing_out))


def resample(arr: np.ndarray, spacing_in, spacing_out, linear: bool, out_dtype=None) -> np.ndarray:
    """Resample to ``spacing_out`` (mm) on MONAI's ``Spacing`` grid (voxel 0 fixed, border padding)."""
    shape = resampled_shape(arr.shape, spacing_in, spacing_out)
    pos = []
    for n_out, si, so, n_in in zip(shape, spacing_in, spacing_out, arr.shape):
        pos.append(None if (abs(si - so) < 1e-9 and n_out == n_in)
                   else np.arange(n_out, dtype=np.float64) * (so / si))
    return sample_axes(arr, pos, linear=linear, out_dtype=out_dtype)


def window_positions(start: float, size: int, scale: float) -> np.ndarray:
    """Voxel positions of a window of ``size`` output voxels, ``scale`` input voxels each,
    whose first input-voxel edge is at ``start - 0.5``; integer positions when scale is 1."""
    if scale == 1.0:
        return start + np.arange(size, dtype=np.float64)
    return start - 0.5 + (np.arange(size, dtype=np.float64) + 0.5) * scale


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-9))
