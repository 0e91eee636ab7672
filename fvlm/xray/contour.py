"""Chest contour of a frontal radiograph: where the thorax is, for context-aware masking.

The contour is found from intensities alone (no learned model), at a small working
resolution, and is meant to be roughly right on any frontal chest film:

1. percentile-stretch and smooth the image; Otsu's threshold splits dark (air: lungs
   and the outside of the body) from bright (soft tissue, bone);
2. the *outside* air is the very dark part connected to the image border; it is removed
   with a safety margin, which leaves the lung fields as the large dark blobs inside;
3. a lung that still touches the border or reaches the top of the body (through the
   supraclavicular air, the neck's soft tissue or an axilla) is opened with growing discs
   until a large piece comes free;
4. each candidate must look like a lung field (:class:`LungLimits`): a plausible share of
   the body, tall, not at the top edge, centred in the upper-middle thorax on its side, and
   a pair must be of similar size and height; a side without one is mirrored from the other
   (a lung opacified on a portable film, or cut off by a pacemaker, still counts);
5. the thorax is the convex hull of the lungs and their mirror image about the patient's
   midline, grown by a small margin.

When no lung passes, or the thorax is implausibly small or large, the fixed central box is
returned instead; the reason is in :attr:`ContourResult.reason` and logged (INFO) on
``fvlm.xray.contour``.
"""
from __future__ import annotations

from dataclasses import dataclass

import logging

import numpy as np

log = logging.getLogger("fvlm.xray.contour")

__all__ = ["ContourResult", "LungLimits", "chest_contour", "central_box", "patch_fraction", "patch_region"]


@dataclass
class ContourResult:
    mask: np.ndarray  #: (H, W) bool, True inside the thorax
    method: str       #: "threshold" (both lungs found), "mirrored" (one found), "box" (fallback)
    lungs: np.ndarray  #: (H, W) bool, the lung-field blobs the hull was built from (may be empty)
    reason: str = ""  #: why a lung was mirrored or the box used ("" when both lungs passed)


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
                piece = lab == lbl
                grown = ndi.binary_dilation(piece, structure=_disk(r)) & comp
                # growing back upwards would reconnect the neck and supraclavicular air
                grown[:np.nonzero(piece.any(1))[0][0]] = False
                return grown
    return None


@dataclass(frozen=True)
class LungLimits:
    """What a lung field of an upright frontal film looks like, relative to the film's extent.

    Rows and columns are fractions of the film (the valid area's bounding box): row 0 is the
    top edge, column 0 the image left (the patient's right).
    """
    area: tuple[float, float] = (0.01, 0.30)      #: one lung, as a fraction of the film area
    height: float = 0.18                           #: a lung is tall: at least this fraction of the film
    top_gap: float = 0.04                          #: its top stays this far below the film's top edge
    centroid_row: tuple[float, float] = (0.2, 0.72)  #: apex-to-base centre (not neck, not bowel gas)
    centroid_col: tuple[float, float] = (0.08, 0.48)  #: right lung; the left one is mirrored
    extent: float = 0.3                            #: area / bounding-box area (not a thin rim or wire)
    size_ratio: float = 0.3                        #: smaller / larger lung (symmetric-ish)
    row_overlap: float = 0.4                       #: shared rows / shorter lung's rows
    hull_area: tuple[float, float] = (0.15, 0.85)  #: the thorax, as a fraction of the film


def _lung_problem(comp: np.ndarray, side: str, film: tuple[int, int, int, int], area: float,
                  lim: LungLimits) -> str | None:
    """Why ``comp`` (a dark blob on ``side``) is not a lung field, or None when it looks like one."""
    from scipy import ndimage as ndi

    r0, r1, c0, c1 = film
    fh, fw = max(1, r1 - r0), max(1, c1 - c0)
    rows, cols = np.nonzero(comp)
    size = comp.sum() / area
    cr, cc = ndi.center_of_mass(comp)
    rel_r, rel_c = (cr - r0) / fh, (cc - c0) / fw
    if side == "left":
        rel_c = 1.0 - rel_c
    height = (rows.max() - rows.min() + 1) / fh
    extent = comp.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    if not lim.area[0] <= size <= lim.area[1]:
        return f"area {size:.2f} of the film outside {lim.area}"
    if (rows.min() - r0) / fh < lim.top_gap:
        return "touches the top edge of the film"
    if height < lim.height:
        return f"height {height:.2f} of the film < {lim.height}"
    if not lim.centroid_row[0] <= rel_r <= lim.centroid_row[1]:
        return f"centre at {rel_r:.2f} of the film height outside {lim.centroid_row}"
    if not lim.centroid_col[0] <= rel_c <= lim.centroid_col[1]:
        return f"centre at {rel_c:.2f} of the film width from its side edge outside {lim.centroid_col}"
    if extent < lim.extent:
        return f"fills {extent:.2f} of its bounding box < {lim.extent}"
    return None


def _pair_problem(right: np.ndarray, left: np.ndarray, lim: LungLimits) -> str | None:
    """Why two lung fields are not a plausible pair (very different sizes or heights), or None."""
    a, b = float(right.sum()), float(left.sum())
    if min(a, b) / max(a, b) < lim.size_ratio:
        return f"lung sizes differ {min(a, b) / max(a, b):.2f} < {lim.size_ratio}"
    ra, rb = np.nonzero(right.any(1))[0], np.nonzero(left.any(1))[0]
    shared = min(ra.max(), rb.max()) - max(ra.min(), rb.min()) + 1
    overlap = shared / min(ra.size, rb.size)
    if overlap < lim.row_overlap:
        return f"lungs share {max(overlap, 0):.2f} of their rows < {lim.row_overlap}"
    return None


def _dark_blobs(small: np.ndarray, v: np.ndarray, work_size: int):
    """Dark regions inside the body at the working size: (labels, count, film edge, body) or None.

    ``body`` is everything but the air and padding joined to the image border: on a film
    with black borders or a tilted plate, the checks measure positions against it.
    """
    from scipy import ndimage as ndi

    vals = small[v]
    lo, hi = np.percentile(vals, [1, 99])
    if hi - lo < 1e-6:
        return None
    x = np.clip((small - lo) / (hi - lo), 0, 1)
    x[~v] = 0.0  # padding counts as outside air
    sm = ndi.gaussian_filter(x, 2.0)
    t = _otsu(sm[v])
    below = sm[v][sm[v] < t]
    if below.size < 10:
        return None
    t_air = _otsu(below / max(t, 1e-6)) * t
    # the image edge and the padding are "outside": air connected to them is not lung
    edge = np.zeros(v.shape, bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    edge |= ~ndi.binary_erosion(v, iterations=1, border_value=0)
    lab, _ = ndi.label(sm < t_air)
    outside = np.isin(lab, list(_border_labels(lab, edge))) | ~v
    air = ndi.binary_dilation(outside, iterations=max(1, int(round(4 * work_size / 256))))
    dark = ndi.binary_opening((sm < t) & ~air, structure=_disk(2))
    lab, n = ndi.label(dark)
    return lab, n, edge, ~outside


def _extent(m: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box of a (H, W) bool mask: (row0, row1, col0, col1), ends exclusive."""
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _top_band(v: np.ndarray, gap: float) -> np.ndarray:
    """The rows within ``gap`` (a fraction of the film height) of the film's top edge: (H, W) bool."""
    rows = np.nonzero(v.any(1))[0]
    band = np.zeros(v.shape, bool)
    band[:rows.min() + max(1, int(round(gap * (rows.max() - rows.min() + 1))))] = True
    return band


def _find_lungs(small: np.ndarray, v: np.ndarray, work_size: int, lim: LungLimits
                ) -> tuple[dict[str, np.ndarray], list[str], float]:
    """The largest plausible lung field on each side, why other candidates were rejected, and
    the body's middle column."""
    from scipy import ndimage as ndi

    found = _dark_blobs(small, v, work_size)
    if found is None:
        return {}, ["no contrast between air and tissue"], 0.0
    lab, n, edge, body = found
    if body.sum() < 0.1 * v.sum():
        return {}, ["no body on the film"], 0.0
    # a dark region reaching the top of the body is joined to the neck's soft tissue or air:
    # cut it free like one joined to the outside air
    edge = edge | _top_band(body, lim.top_gap)
    film = _extent(body)
    mid_c = (film[2] + film[3] - 1) / 2
    area = float(body.sum())
    sizes = ndi.sum(lab > 0, lab, range(1, n + 1)) if n else np.zeros(0)
    best: dict[str, np.ndarray] = {}
    why: list[str] = []
    for i in np.argsort(sizes)[::-1][:8]:
        if sizes[i] < lim.area[0] * area:
            break
        comp = _detach(lab == i + 1, edge)
        if comp is None or comp.sum() < lim.area[0] * area:
            why.append("a dark region stays joined to the outside air")
            continue
        side = "right" if ndi.center_of_mass(comp)[1] < mid_c else "left"  # patient's right: image left
        problem = _lung_problem(comp, side, film, area, lim)
        if problem:
            why.append(f"{side} candidate: {problem}")
        elif side not in best or comp.sum() > best[side].sum():
            best[side] = comp
    if not best:
        why.append("no lung-like dark region")
    return best, why, mid_c


def _mirror(comp: np.ndarray, mid_c: float) -> np.ndarray:
    cc = np.arange(comp.shape[1])
    return comp[:, np.clip(np.round(2 * mid_c - cc).astype(int), 0, comp.shape[1] - 1)]


def chest_contour(img: np.ndarray, valid: np.ndarray | None = None, work_size: int = 256,
                  margin: float = 0.05, limits: LungLimits = LungLimits()) -> ContourResult:
    """Thorax mask of a frontal chest radiograph.

    ``img``: (H, W) float in [0, 1], bones bright (MONOCHROME2), upright.
    ``valid``: (H, W) bool, the pixels that belong to the film (False on padding).
    ``margin``: how far the hull is grown, as a fraction of the working size.
    ``limits``: the sanity checks a lung field must pass (:class:`LungLimits`).
    Returns a :class:`ContourResult` whose ``mask`` has the shape of ``img``; when the checks
    fail, the central box, with the reason in ``reason`` and in the log (``fvlm.xray.contour``).
    """
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise ValueError(f"chest_contour expects a (H, W) image, got shape {img.shape}")
    H, W = img.shape
    valid = np.ones((H, W), bool) if valid is None else np.asarray(valid, bool)
    scale = work_size / max(H, W)
    ws = (max(8, int(round(H * scale))), max(8, int(round(W * scale))))
    v = _resize_nearest_bool(valid, ws)

    def fallback(reason, lungs=None):
        log.info("chest contour: central box instead (%s)", reason)
        lungs = np.zeros((H, W), bool) if lungs is None else _resize_nearest_bool(lungs, (H, W))
        return ContourResult(central_box((H, W)) & valid, "box", lungs, reason)

    if v.sum() < 0.1 * v.size:
        return fallback("the film covers under 10% of the image")
    best, why, mid_c = _find_lungs(_resize_float(img, ws), v, work_size, limits)
    if not best:
        return fallback("; ".join(why))
    reason = ""
    if len(best) == 2:
        reason = _pair_problem(best["right"], best["left"], limits) or ""
        if reason:  # keep the larger, better-aerated lung and mirror it (the other may be opacified)
            best = {k: c for k, c in best.items() if c.sum() == max(x.sum() for x in best.values())}
        else:  # the patient's midline: halfway between the outer (rib) edges of the two lungs
            mid_c = (_extent(best["right"])[2] + _extent(best["left"])[3] - 1) / 2
    else:
        reason = f"no plausible {'left' if 'right' in best else 'right'} lung"
    lungs = np.zeros(ws, bool)
    for comp in best.values():
        lungs |= comp
    method = "threshold" if len(best) == 2 else "mirrored"
    # the thorax is symmetric: a lung cut short by a pacemaker, an effusion or an opacity
    # is completed by the mirror image of the other one
    hull = convex_hull_image(lungs | _mirror(lungs, mid_c))
    hull_frac = ndi.binary_dilation(hull, structure=_disk(max(1, int(round(margin * work_size))))) & v
    frac = hull_frac.sum() / v.sum()
    if not limits.hull_area[0] <= frac <= limits.hull_area[1]:
        return fallback(f"thorax covers {frac:.2f} of the film, outside {limits.hull_area}", lungs)
    if method == "mirrored":
        log.debug("chest contour: one lung mirrored (%s)", reason)
    return ContourResult(_resize_nearest_bool(hull_frac, (H, W)) & valid, method,
                         _resize_nearest_bool(lungs, (H, W)), reason)


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
