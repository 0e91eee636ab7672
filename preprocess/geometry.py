"""Voxel geometry: affine checks, canonical orientation, separable resampling, windows.

The resampler is fvlm's own fast path (numpy only) (tested against MONAI's ``Spacingd`` in
``tests/test_preprocess_geometry.py``): linear interpolation is separable, so a
3D resample is three 1D gathers along the axes, done on the axis with the largest
reduction first so the intermediate arrays stay small. The grid follows MONAI's
``Spacing`` convention: voxel 0 keeps its world position, output size
``round((n - 1) * s_in / s_out + 1)``, positions past the last voxel take its value.
"""
from __future__ import annotations

import math

import numpy as np

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


def _gather_axis(a: np.ndarray, ax: int, pos: np.ndarray, linear: bool, pad) -> np.ndarray:
    n = a.shape[ax]
    posd = np.asarray(pos, dtype=np.float64)
    if linear:
        pc = np.clip(posd, 0.0, n - 1.0)
        i0 = np.floor(pc).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1] * a.ndim
        shape[ax] = len(posd)
        w = (pc - i0).astype(np.float32).reshape(shape)
        lo = np.take(a, i0, axis=ax).astype(np.float32, copy=False)
        hi = np.take(a, i1, axis=ax).astype(np.float32, copy=False)
        hi -= lo                      # lo + (hi - lo) * w, in place
        hi *= w
        hi += lo
        out = hi
    else:
        idx = np.clip(np.floor(posd + 0.5), 0, n - 1).astype(np.intp)
        out = np.take(a, idx, axis=ax)
    if pad is not None:
        outside = (posd < -0.5) | (posd > n - 0.5)
        if outside.any():
            sl = [slice(None)] * a.ndim
            sl[ax] = np.nonzero(outside)[0]
            out[tuple(sl)] = pad
    return out


def sample_axes(arr: np.ndarray, positions, linear: bool, pad=None, out_dtype=None) -> np.ndarray:
    """Sample a 3D array on a separable grid.

    Args:
        arr: ``[X, Y, Z]`` array (any numeric dtype).
        positions: per axis, the (float) voxel positions to sample, or None to keep the axis.
        linear: linear interpolation (True) or nearest neighbour (False).
        pad: value for positions outside ``[-0.5, n - 0.5]``; None clamps to the border.
        out_dtype: result dtype (rounded when integer); default float32 (linear) / input dtype.
    """
    if arr.ndim == 3 and not arr.flags.c_contiguous and arr.T.flags.c_contiguous:
        # NIfTI data are Fortran-ordered: work on the C-ordered transpose (axes reversed), so
        # every gather reads and writes memory in order, and hand back the transposed view
        return sample_axes(arr.T, list(positions)[::-1], linear, pad, out_dtype).T
    t = arr
    # shrink first: the axis whose output/input ratio is smallest goes first
    order = sorted((i for i in range(3) if positions[i] is not None),
                   key=lambda i: len(positions[i]) / max(1, arr.shape[i]))
    for ax in order:
        p = np.asarray(positions[ax], dtype=np.float64)
        if pad is not None or not _is_identity(p, t.shape[ax]):
            t = _gather_axis(t, ax, p, linear, pad)
    out = t
    if out_dtype is None:
        out_dtype = np.float32 if linear else arr.dtype
    out_dtype = np.dtype(out_dtype)
    if out.dtype != out_dtype:
        if out_dtype.kind in "iu" and out.dtype.kind == "f":
            info = np.iinfo(out_dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(out_dtype)
    elif out is arr:
        out = arr.copy()
    return out


def _is_identity(p: np.ndarray, n: int) -> bool:
    return len(p) == n and np.array_equal(p, np.arange(n, dtype=np.float64))


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
