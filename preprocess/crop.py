"""Fixed-shape outputs: per-anatomy crops around mask bounding boxes, and the centred whole volume.

Crop policy (FORMATS.md §2): the box of the anatomy mask plus ``margin_mm`` per side;
if it fits ``crop_shape`` the crop is the ``crop_shape`` window centred on it at native
spacing (exact voxels, no interpolation); otherwise ``oversize="resize"`` grows the
window by one factor ``scale`` on all axes and resamples it to ``crop_shape`` (image
linear, mask nearest), ``oversize="clip"`` keeps the centred native window.
"""
from __future__ import annotations

import numpy as np

from fvlm.data.crop import crop_info, crop_positions, cut_crop

__all__ = ["label_boxes", "crop_anatomy", "center_fit", "window"]


def label_boxes(lab: np.ndarray, n_labels: int) -> tuple[dict, np.ndarray]:
    """Bounding boxes ``{label: (x0, y0, z0, x1, y1, z1)}`` (end exclusive) and voxel counts of labels 1..n."""
    from scipy import ndimage

    counts = np.zeros(n_labels + 1, dtype=np.int64)
    boxes = {}
    for k, sl in enumerate(ndimage.find_objects(lab, max_label=n_labels), start=1):
        if sl is not None:  # count inside the box only (a bincount would widen the whole map to int64)
            boxes[k] = (sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop)
            counts[k] = int(np.count_nonzero(lab[sl] == k))
    return boxes, counts


def crop_anatomy(vol: np.ndarray, lab: np.ndarray, label: int, box, spacing, crop_shape, margin_mm: float,
                 oversize: str = "resize") -> tuple[np.ndarray, np.ndarray, dict]:
    """Crop one anatomy (the policy lives in :mod:`fvlm.data.crop`, shared with the shard reader).

    Args:
        vol: int16 HU ``[X, Y, Z]`` at ``spacing`` (mm); lab: uint8 anatomy label map on the same grid.
        box: ``(x0, y0, z0, x1, y1, z1)`` of ``lab == label``.
        crop_shape: output ``(x, y, z)``.
    Returns ``(crop int16, mask uint8 {0, 1}, info)``; info has ``origin_vox`` (position of the
    first output voxel on the input grid), ``scale`` and ``spacing_mm`` of the crop.
    """
    pos, scale = crop_positions(box, spacing, crop_shape, margin_mm, oversize)
    img, msk = cut_crop(vol, lab, label, pos, scale)
    return img, msk, crop_info(pos, scale, spacing)


def window(arr: np.ndarray, start, shape, pad) -> np.ndarray:
    """``arr[start : start + shape]`` per axis, padded with ``pad`` where it leaves the array."""
    out = np.full(tuple(int(s) for s in shape), pad, dtype=arr.dtype)
    src, dst = [], []
    for s0, n, o in zip(start, arr.shape, shape):
        a, b = max(0, s0), min(n, s0 + int(o))
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s0, b - s0))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def center_fit(arr: np.ndarray, shape, pad) -> tuple[np.ndarray, list[int]]:
    """Centre-pad / centre-crop ``arr`` to ``shape``; returns ``(out, offset)`` where ``offset[i]``
    is the output index of input voxel 0 along axis i (negative when cropped)."""
    out = np.full(tuple(int(s) for s in shape), pad, dtype=arr.dtype)
    off = [(int(o) - int(n)) // 2 for o, n in zip(shape, arr.shape)]
    src, dst = [], []
    for o, n, d in zip(shape, arr.shape, off):
        s0, d0 = max(0, -d), max(0, d)
        ln = min(n - s0, int(o) - d0)
        src.append(slice(s0, s0 + ln))
        dst.append(slice(d0, d0 + ln))
    out[tuple(dst)] = arr[tuple(src)]
    return out, off
