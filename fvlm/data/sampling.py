"""Separable sampling of 3D grids, in memory or straight from an HDF5 dataset (a hyperslab read).

Linear interpolation on an axis-aligned grid is separable: a 3D resample is three 1D
gathers, run on the axis with the largest reduction first so intermediates stay small.
``cut`` does the same on any sliceable source (a numpy array or an ``h5py.Dataset``): it
reads only the box of voxels the sample positions touch, so cutting a crop out of a stored
volume decompresses only the chunks under that box, and gives bit-identical values to
``sample_axes`` on the whole array (same gathers, same order, same float32 arithmetic).

Preprocessing (``preprocess.geometry``) and the shard reader share this module, so a crop
cut at read time equals the crop cut from the full volume in memory.
"""
from __future__ import annotations

import numpy as np

__all__ = ["sample_axes", "cut", "axis_order", "axis_taps", "ANTIALIAS_MIN_SHRINK"]

#: an anti-aliased axis is area-averaged only when it shrinks by more than this (below it, the
#: two linear taps already touch every source voxel)
ANTIALIAS_MIN_SHRINK = 1.5


def axis_taps(pos, n: int, linear: bool, step: float = 1.0, antialias: bool = False):
    """The source voxels and weights of each output voxel of one axis (the device resize's plan).

    Args:
        pos: ``(m,)`` float positions on an axis of ``n`` source voxels (voxel centres at integers).
        linear: two-tap linear interpolation (border-clamped, as ``sample_axes``); else nearest.
        step: distance between neighbouring output voxels, in source voxels (the shrink factor).
        antialias: with ``linear`` and ``step > ANTIALIAS_MIN_SHRINK``, area averaging instead: each
            output voxel is the mean of the source over its footprint ``[p - step/2, p + step/2]``
            (partial voxels weighted by overlap), so a structure smaller than ``step`` voxels is
            averaged in rather than kept or dropped depending on where the samples fall.
    Returns ``(idx (m, K) int64, w (m, K) float32, outside (m,) bool)``: output ``i`` is
    ``sum_k w[i, k] * src[idx[i, k]]``; ``outside`` marks positions beyond ``[-0.5, n - 0.5]`` (padding).
    """
    p = np.asarray(pos, dtype=np.float64)
    outside = (p < -0.5) | (p > n - 0.5)
    if not linear:
        idx = np.clip(np.floor(p + 0.5), 0, n - 1).astype(np.int64)[:, None]
        return idx, np.ones(idx.shape, np.float32), outside
    if antialias and step > ANTIALIAS_MIN_SHRINK:
        a = np.clip(p - step / 2.0, -0.5, n - 0.5)
        b = np.clip(p + step / 2.0, -0.5, n - 0.5)
        first = np.clip(np.floor(a + 0.5), 0, n - 1).astype(np.int64)
        last = np.clip(np.ceil(b - 0.5), 0, n - 1).astype(np.int64)
        K = int(max(1, (last - first).max() + 1)) if len(p) else 1
        idx = first[:, None] + np.arange(K)[None, :]
        w = np.clip(np.minimum(b[:, None], idx + 0.5) - np.maximum(a[:, None], idx - 0.5), 0.0, None)
        w[idx > last[:, None]] = 0.0
        idx = np.minimum(idx, n - 1)
        total = w.sum(1, keepdims=True)
        empty = total[:, 0] <= 0                      # only outside positions: any tap, it is padded
        w[empty, 0], total[empty] = 1.0, 1.0
        return idx, (w / total).astype(np.float32), outside
    pc = np.clip(p, 0.0, n - 1.0)
    i0 = np.floor(pc).astype(np.int64)
    f = pc - i0
    if not f.any():                                  # whole voxels: a copy, one tap
        return i0[:, None], np.ones((len(p), 1), np.float32), outside
    idx = np.stack([i0, np.minimum(i0 + 1, n - 1)], 1)
    return idx, np.stack([1.0 - f, f], 1).astype(np.float32), outside


def axis_order(positions, shape) -> list[int]:
    """Axes that are sampled, smallest output/input ratio first (shrink early)."""
    return sorted((i for i in range(3) if positions[i] is not None),
                  key=lambda i: len(positions[i]) / max(1, shape[i]))


def _indices(pos: np.ndarray, n: int, linear: bool):
    """Per-position source indices (and weights) on an axis of ``n`` voxels, border-clamped."""
    if linear:
        pc = np.clip(pos, 0.0, n - 1.0)
        i0 = np.floor(pc).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, (pc - i0).astype(np.float32)
    idx = np.clip(np.floor(pos + 0.5), 0, n - 1).astype(np.intp)
    return idx, None, None


def _gather(a: np.ndarray, ax: int, i0, i1, w, outside, pad) -> np.ndarray:
    if i1 is not None:
        shape = [1] * a.ndim
        shape[ax] = len(i0)
        lo = np.take(a, i0, axis=ax).astype(np.float32, copy=False)
        hi = np.take(a, i1, axis=ax).astype(np.float32, copy=False)
        hi -= lo                      # lo + (hi - lo) * w, in place
        hi *= w.reshape(shape)
        hi += lo
        out = hi
    else:
        out = np.take(a, i0, axis=ax)
    if pad is not None and outside is not None and outside.any():
        sl = [slice(None)] * a.ndim
        sl[ax] = np.nonzero(outside)[0]
        out[tuple(sl)] = pad
    return out


def _is_identity(p: np.ndarray, n: int) -> bool:
    return len(p) == n and np.array_equal(p, np.arange(n, dtype=np.float64))


def _result_dtype(src_dtype, linear: bool, out_dtype) -> np.dtype:
    """The dtype a sampling returns: ``out_dtype``, else float32 (linear) or the source's."""
    return np.dtype(out_dtype if out_dtype is not None else (np.float32 if linear else src_dtype))


def _finish(out: np.ndarray, src_dtype, linear: bool, out_dtype, copy_of=None) -> np.ndarray:
    out_dtype = _result_dtype(src_dtype, linear, out_dtype)
    if out.dtype != out_dtype:
        if out_dtype.kind in "iu" and out.dtype.kind == "f":
            info = np.iinfo(out_dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(out_dtype)
    elif copy_of is not None and out is copy_of:
        out = out.copy()
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
    for ax in axis_order(positions, arr.shape):
        p = np.asarray(positions[ax], dtype=np.float64)
        if pad is not None or not _is_identity(p, t.shape[ax]):
            i0, i1, w = _indices(p, t.shape[ax], linear)
            outside = (p < -0.5) | (p > t.shape[ax] - 0.5) if pad is not None else None
            t = _gather(t, ax, i0, i1, w, outside, pad)
    return _finish(t, arr.dtype, linear, out_dtype, copy_of=arr)


def cut(src, positions, linear: bool, pad, out_dtype=None, shape=None) -> np.ndarray:
    """``sample_axes(src[...], positions, linear, pad, out_dtype)``, reading only what it needs.

    ``src`` is a 3D numpy array or ``h5py.Dataset`` (``shape`` defaults to ``src.shape``);
    ``positions`` gives float voxel positions for every axis. Only the box of voxels the
    positions touch is read (one hyperslab); positions outside ``[-0.5, n - 0.5]`` get
    ``pad``.

    A window of whole voxels (every inside position an integer, consecutive: a native-spacing
    crop) is one slice copy into the padded output. Otherwise nearest sampling runs separable
    ``np.take`` passes, shrinking axis first (3.5x faster than one ``np.ix_`` gather, measured on
    a 300 x 260 x 110 label box), and linear sampling the separable passes of ``sample_axes``
    (measured faster than gathering the 8 corners at once). Values are the same on every path.
    """
    shape = tuple(int(s) for s in (shape or src.shape))
    pos = [np.asarray(p, dtype=np.float64) for p in positions]
    plans, box = [], []
    for p, n in zip(pos, shape):
        outside = (p < -0.5) | (p > n - 0.5)
        i0, i1, w = _indices(p, n, linear)
        inside = ~outside
        if not inside.any():   # the whole output is padding: read nothing
            return np.full(tuple(len(q) for q in pos), pad, dtype=_result_dtype(src.dtype, linear, out_dtype))
        used = i0[inside] if i1 is None else np.concatenate([i0[inside], i1[inside]])
        lo, hi = int(used.min()), int(used.max()) + 1
        box.append(slice(lo, hi))
        # outside positions keep any in-box index: they are overwritten with pad
        i0 = np.where(inside, i0, lo) - lo
        i1 = None if i1 is None else np.where(inside, i1, lo) - lo
        plans.append((i0, i1, w, outside))
    dtype = _result_dtype(src.dtype, linear, out_dtype)
    window = _window(pos, plans, box)
    # a plain copy gives the reference values only when the cast is exact (float -> int is rounded)
    if window is not None and (pad is not None or not window[2]) and np.can_cast(src.dtype, dtype, "safe"):
        return _copy_window(src, window, pos, pad, dtype)
    t = np.asarray(src[tuple(box)])
    if not linear:
        return _finish(_nearest(t, plans, pos, shape, pad), src.dtype, linear, out_dtype)
    for ax in axis_order(pos, shape):
        i0, i1, w, outside = plans[ax]
        if not (i1 is None and not outside.any() and _is_identity(i0.astype(np.float64), t.shape[ax])):
            t = _gather(t, ax, i0, i1, w, outside, pad)
    return _finish(t, src.dtype, linear, out_dtype)


def _window(pos, plans, box):
    """``(read_box, out_slices, padded)`` when the inside positions of every axis are consecutive
    integers (a whole-voxel window), else None. ``read_box`` is those voxels (the lerp's box may
    hold one more, whose weight is 0); ``padded`` says whether any position is outside."""
    read, out_sl, any_out = [], [], False
    for p, (_, _, _, outside), b in zip(pos, plans, box):
        k = np.nonzero(~outside)[0]
        k0, k1 = int(k[0]), int(k[-1]) + 1
        if k1 - k0 != len(k) or not np.array_equal(p[k0:k1], np.arange(b.start, b.start + k1 - k0,
                                                                        dtype=np.float64)):
            return None
        any_out |= bool(outside.any())
        read.append(slice(b.start, b.start + k1 - k0))
        out_sl.append(slice(k0, k1))
    return read, out_sl, any_out


def _copy_window(src, window, pos, pad, dtype: np.dtype) -> np.ndarray:
    """The output of a whole-voxel window: the voxels, copied once into the (padded) output."""
    read, out_sl, padded = window
    shape = tuple(len(p) for p in pos)
    out = np.full(shape, pad, dtype) if padded else np.empty(shape, dtype)
    if isinstance(src, np.ndarray) or dtype != src.dtype:
        out[tuple(out_sl)] = src[tuple(read)]
    else:  # h5py: decompress straight into the output, no temporary
        src.read_direct(out, np.s_[tuple(read)], np.s_[tuple(out_sl)])
    return out


def _nearest(t: np.ndarray, plans, pos, shape, pad) -> np.ndarray:
    """Nearest sampling as separable ``np.take`` passes (shrinking axis first), then the padding."""
    out = t
    for ax in axis_order(pos, shape):
        i0 = plans[ax][0]
        if not _is_identity(i0.astype(np.float64), out.shape[ax]):
            out = np.take(out, i0, axis=ax)
    if out is t:
        out = t.copy()
    if pad is not None:
        for ax, (_, _, _, outside) in enumerate(plans):
            if outside.any():
                sl = [slice(None)] * 3
                sl[ax] = np.nonzero(outside)[0]
                out[tuple(sl)] = pad
    return out
