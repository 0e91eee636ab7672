"""Chest contour of a frontal radiograph: where the thorax is, for context-aware masking.

The contour is found from intensities alone (no learned model), at a small working
resolution, and is meant to be roughly right on any frontal chest film:

1. percentile-stretch and smooth the image; Otsu's threshold splits dark (air: lungs
   and the outside of the body) from bright (soft tissue, bone);
2. the *outside* air is the very dark part connected to the image border; it is removed
   with a safety margin, which leaves the lung fields as the large dark blobs inside;
3. a lung that still touches the border (through the supraclavicular air or an axilla)
   is opened with growing discs until a large piece comes free;
4. the best blob on each side of the midline is kept (a missing side is mirrored from
   the other), and the thorax is their convex hull, grown by a small margin.

When nothing plausible is found the fixed central box is returned instead, and
:func:`chest_contour` reports which method was used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ContourResult", "chest_contour", "central_box", "patch_fraction", "patch_region"]


@dataclass
class ContourResult:
    mask: np.ndarray  #: (H, W) bool, True inside the thorax
    method: str       #: "threshold" (both lungs found), "mirrored" (one found), "box" (fallback)
    lungs: np.ndarray  #: (H, W) bool, the lung-field blobs the hull was built from (may be empty)


def central_box(shape: tuple[int, int], frac: tuple[float, float] = (0.7, 0.8),
                center: tuple[float, float] = (0.45, 0.5)) -> np.ndarray:
    """A fixed box approximating the chest: ``frac`` = (height, width) as a fraction of the image.

    ``center`` = (row, col) of the box centre as a fraction; the default sits a little above
    the middle because the lungs of a frontal film usually do. Returns (H, W) bool.
    """
    h, w = shape
    bh, bw = frac[0] * h, frac[1] * w
    r0 = int(round(center[0] * h - bh / 2))
    c0 = int(round(center[1] * w - bw / 2))
    m = np.zeros((h, w), bool)
    m[max(r0, 0):max(0, min(h, int(round(r0 + bh)))), max(c0, 0):max(0, min(w, int(round(c0 + bw))))] = True
    return m


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _otsu(v: np.ndarray) -> float:
    hist, edges = np.histogram(v, bins=128, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(mids[int(np.argmax(between))] + (edges[1] - edges[0]) / 2)


def _border_labels(lab: np.ndarray, edge: np.ndarray) -> set[int]:
    return set(np.unique(lab[edge]).tolist()) - {0}


def _resize_nearest_bool(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * m.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * m.shape[1] / shape[1]).astype(int)
    return m[rows][:, cols]


def _resize_float(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.BILINEAR), np.float32)


def _detach(comp: np.ndarray, edge: np.ndarray) -> np.ndarray | None:
    """Cut a blob free from the image border by openings of growing radius (None if it won't)."""
    from scipy import ndimage as ndi

    if not comp[edge].any():
        return comp
    total = comp.sum()
    for r in (2, 4, 6, 8, 11, 14):
        o = ndi.binary_opening(comp, structure=_disk(r))
        lab, n = ndi.label(o)
        if n == 0:
            return None
        bad = _border_labels(lab, edge)
        sizes = ndi.sum(o, lab, range(1, n + 1))
        cands = [(sizes[i], i + 1) for i in range(n) if (i + 1) not in bad]
        if cands:
            s, lbl = max(cands)
            if s > 0.3 * total:
                return ndi.binary_dilation(lab == lbl, structure=_disk(r)) & comp
    return None


def chest_contour(img: np.ndarray, valid: np.ndarray | None = None, work_size: int = 256,
                  margin: float = 0.05, min_lung: float = 0.01) -> ContourResult:
    """Thorax mask of a frontal chest radiograph.

    ``img``: (H, W) float in [0, 1], bones bright (MONOCHROME2), upright.
    ``valid``: (H, W) bool, the pixels that belong to the film (False on padding).
    ``margin``: how far the hull is grown, as a fraction of the working size.
    ``min_lung``: smallest plausible lung blob, as a fraction of the valid area.
    Returns a :class:`ContourResult` whose ``mask`` has the shape of ``img``.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise ValueError(f"chest_contour expects a (H, W) image, got shape {img.shape}")
    H, W = img.shape
    if valid is None:
        valid = np.ones((H, W), bool)
    scale = work_size / max(H, W)
    ws = (max(8, int(round(H * scale))), max(8, int(round(W * scale))))
    small = _resize_float(img, ws)
    v = _resize_nearest_bool(np.asarray(valid, bool), ws)

    def fallback(method="box", lungs=None):
        box = central_box((H, W)) & np.asarray(valid, bool)
        return ContourResult(box, method, np.zeros((H, W), bool) if lungs is None else lungs)

    if v.sum() < 0.1 * v.size:
        return fallback()
    vals = small[v]
    lo, hi = np.percentile(vals, [1, 99])
    if hi - lo < 1e-6:
        return fallback()
    x = np.clip((small - lo) / (hi - lo), 0, 1)
    x[~v] = 0.0  # padding counts as outside air
    sm = ndi.gaussian_filter(x, 2.0)
    t = _otsu(sm[v])
    below = sm[v][sm[v] < t]
    if below.size < 10:
        return fallback()
    t_air = _otsu(below / max(t, 1e-6)) * t
    # the image edge and the padding are "outside": air connected to them is not lung
    edge = np.zeros(ws, bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    edge |= ~ndi.binary_erosion(v, iterations=1, border_value=0)
    lab, _ = ndi.label(sm < t_air)
    air = np.isin(lab, list(_border_labels(lab, edge))) | ~v
    air = ndi.binary_dilation(air, iterations=max(1, int(round(4 * work_size / 256))))
    dark = ndi.binary_opening((sm < t) & ~air, structure=_disk(2))
    lab, n = ndi.label(dark)
    if n == 0:
        return fallback()
    sizes = ndi.sum(dark, lab, range(1, n + 1))
    area = v.sum()
    rows, cols = np.nonzero(v)
    mid_c = (cols.min() + cols.max()) / 2
    r_top, r_span = rows.min(), max(1, rows.max() - rows.min())
    best: dict[str, tuple[float, np.ndarray]] = {}
    for i in np.argsort(sizes)[::-1][:8]:
        if sizes[i] < min_lung * area:
            break
        comp = _detach(lab == i + 1, edge)
        if comp is None or comp.sum() < min_lung * area:
            continue
        cr, cc = ndi.center_of_mass(comp)
        rel_r = (cr - r_top) / r_span
        if not 0.15 <= rel_r <= 0.85:  # supraclavicular air, bowel gas
            continue
        side = "right" if cc < mid_c else "left"  # patient's right is on the image left
        if side not in best or comp.sum() > best[side][0]:
            best[side] = (float(comp.sum()), comp)
    if not best:
        return fallback()
    lungs = np.zeros(ws, bool)
    for _, comp in best.values():
        lungs |= comp
    method = "threshold"
    if len(best) == 1:
        # mirror the found lung about the film's midline to stand in for the other one
        (_, comp), = best.values()
        cc = np.arange(ws[1])
        src = np.clip(np.round(2 * mid_c - cc).astype(int), 0, ws[1] - 1)
        hull_src = comp | comp[:, src]
        method = "mirrored"
    else:
        hull_src = lungs
    hull = convex_hull_image(hull_src)
    grow = max(1, int(round(margin * work_size)))
    hull = ndi.binary_dilation(hull, structure=_disk(grow)) & v
    frac = hull.sum() / area
    if not 0.1 <= frac <= 0.9:
        return fallback(lungs=_resize_nearest_bool(lungs, (H, W)))
    return ContourResult(_resize_nearest_bool(hull, (H, W)) & np.asarray(valid, bool), method,
                         _resize_nearest_bool(lungs, (H, W)))


def patch_fraction(mask: np.ndarray, patch_size: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch inside ``mask``: (H, W) bool -> (H//ph * W//pw,) float, row-major."""
    ph, pw = patch_size
    H, W = mask.shape[-2:]
    if H % ph or W % pw:
        raise ValueError(f"mask {H}x{W} is not divisible by the patch size {ph}x{pw}")
    m = np.asarray(mask, np.float32).reshape(H // ph, ph, W // pw, pw)
    return m.mean(axis=(1, 3)).reshape(-1)


def patch_region(mask: np.ndarray, patch_size: tuple[int, int], min_frac: float = 0.5) -> np.ndarray:
    """Patches that count as inside ``mask``: (N,) bool, True where at least ``min_frac`` is inside."""
    return patch_fraction(mask, patch_size) >= min_frac
