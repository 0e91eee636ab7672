"""The anatomy crop policy (FORMATS.md §2), as pure functions of a mask bounding box.

Shards v2 store each case's resampled volume and label map once; an anatomy crop is cut
from them when it is read. The window is the mask box plus ``margin_mm`` per side; if it
fits ``crop_shape`` the crop is the ``crop_shape`` window centred on it at native spacing
(exact voxels); otherwise ``oversize="resize"`` grows the window by one factor ``scale``
on all axes (aspect kept) and samples it to ``crop_shape`` (image linear, mask nearest),
``oversize="clip"`` keeps the centred native window.
"""
from __future__ import annotations

import numpy as np

from .sampling import cut

__all__ = ["crop_positions", "cut_crop", "crop_info"]

AIR_HU = -1024


def crop_positions(box, spacing, crop_shape, margin_mm: float, oversize: str = "resize"):
    """Sample positions of the crop of a mask box.

    Args:
        box: ``(x0, y0, z0, x1, y1, z1)`` of the mask (end exclusive) on the volume grid.
        spacing: voxel spacing (mm) of that grid; crop_shape: output ``(x, y, z)`` voxels.
    Returns ``(positions, scale)``: per axis the float voxel positions (integers when
    ``scale == 1``) of the crop's voxels on the volume grid.
    """
    b = np.asarray(box, dtype=np.float64)
    m = float(margin_mm) / np.asarray(spacing, dtype=np.float64)
    lo = b[:3] - 0.5 - m                # voxel edges of box + margin
    hi = b[3:] - 0.5 + m
    cs = np.asarray(crop_shape, dtype=np.float64)
    scale = float(max(1.0, ((hi - lo) / cs).max())) if oversize == "resize" else 1.0
    center = 0.5 * (lo + hi)
    pos = []
    for i in range(3):
        if scale == 1.0:  # native spacing: integer positions, an exact voxel window
            p0 = int(np.floor(center[i] - (cs[i] - 1) / 2.0 + 0.5))
            pos.append(p0 + np.arange(int(cs[i]), dtype=np.float64))
        else:
            start = center[i] - 0.5 * cs[i] * scale
            pos.append(start + (np.arange(int(cs[i]), dtype=np.float64) + 0.5) * scale - 0.5)
    return pos, scale


def crop_info(positions, scale: float, spacing) -> dict:
    """``origin_vox`` (position of the first crop voxel), ``scale`` and ``spacing_mm`` of a crop."""
    return {"origin_vox": [round(float(p[0]), 3) for p in positions], "scale": round(scale, 4),
            "spacing_mm": [round(float(s) * scale, 4) for s in spacing]}


def cut_crop(vol, lab, label: int, positions, scale: float, shape=None) -> tuple[np.ndarray, np.ndarray]:
    """``(crop int16 HU, mask uint8 {0, 1})`` of one anatomy, cut from ``vol`` / ``lab``
    (numpy arrays or ``h5py.Dataset`` s of the same grid; only the touched hyperslab is read).
    Outside the volume the crop is ``AIR_HU`` and the mask 0."""
    img = cut(vol, positions, linear=scale != 1.0, pad=AIR_HU, out_dtype=np.int16, shape=shape)
    msk = cut(lab, positions, linear=False, pad=0, shape=shape)
    return img, (msk == label).view(np.uint8)  # bool and uint8 share a layout: no copy
