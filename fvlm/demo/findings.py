"""Findings inserted into the demo corpus, each with a documented CT appearance.

Every finding is a function ``insert(case, rng, size, hu) -> dict | None`` registered in
:data:`FINDINGS` under its fvlm54 diagnosis id. ``size`` and ``hu`` are ``(low, high)``
ranges from the preset (``configs/demo/*.yaml``); what they mean (diameter in mm, a
linear scale factor, a thickness, an absolute HU or a change in HU) is stated per finding.
An insert edits ``case.hu`` (float HU), ``case.labels`` (TotalSegmentator v2 ids) and
``case.lesions`` in place, and returns the ground-truth record (or None when the anatomy
has no room for it, so the finding is not claimed).

Sizes are chosen to be what a radiologist would call realistic and still visible at 3 mm
voxels (a 15-30 mm cyst, not 3 voxels). Partial volume at the lesion edge is modelled by
blending with the fraction of the voxel inside the lesion.

Ground-truth masks: every lesion voxel lies inside the fvlm54 anatomy of its finding.
Two deliberate choices make that true where TotalSegmentator would differ: pleural
effusion voxels keep their lung-lobe label and pericardial effusion voxels are labelled
heart (the fluid stays in the organ crop, like the taxonomy's suggested mask dilation),
and renal cyst voxels get TotalSegmentator's ``kidney_cyst_left/right`` ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .templates import ANATOMY_IDS, TS

LOBE_NAMES = {10: ("left", "upper"), 11: ("left", "lower"), 12: ("right", "upper"),
              13: ("right", "middle"), 14: ("right", "lower")}


@dataclass
class Case:
    """A volume being edited: ``hu`` float32 ``[X, Y, Z]`` HU, ``labels`` uint8 TS v2 ids,
    ``lesions`` uint8 (0 none, k = ``records[k-1]``), isotropic ``spacing`` in mm."""

    region: str
    hu: np.ndarray
    labels: np.ndarray
    lesions: np.ndarray
    spacing: float = 3.0
    records: list = field(default_factory=list)
    diffuse_ids: set = field(default_factory=set)

    def mask(self, anatomy: str) -> np.ndarray:
        return np.isin(self.labels, ANATOMY_IDS[anatomy])

    def has(self, anatomy: str, min_voxels: int = 30) -> bool:
        return int(self.mask(anatomy).sum()) >= min_voxels

    def free(self) -> np.ndarray:
        """Voxels not yet taken by a focal lesion (diffuse findings may be overwritten)."""
        taken = self.lesions > 0
        for i in self.diffuse_ids:
            taken &= self.lesions != i
        return ~taken

    def add(self, finding: str, anatomy: str, lesion: np.ndarray, *, diffuse: bool = False,
            **info) -> dict:
        """Write ``lesion`` (bool mask) as the next lesion id and return its record."""
        lid = len(self.records) + 1
        if lid > 255:
            raise RuntimeError("more than 255 findings in one case")
        self.lesions[lesion] = lid
        pts = np.argwhere(lesion)
        c = pts.mean(0)
        centre = pts[np.argmin(((pts - c) ** 2).sum(1))]
        rec = {"finding": finding, "anatomy": anatomy, "lesion_id": lid,
               "centre_vox": [int(v) for v in centre], **info}
        self.records.append(rec)
        if diffuse:
            self.diffuse_ids.add(lid)
        return rec


# --------------------------------------------------------------------------- geometry


def _bbox(mask: np.ndarray, pad: int = 0):
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _place(mask: np.ndarray, radius_vox: float, rng: np.random.Generator,
           max_depth: float | None = None) -> tuple | None:
    """A random voxel of ``mask`` at least ``radius_vox`` (and at most ``max_depth``) voxels
    from its outside; None if there is none."""
    if not mask.any():
        return None
    box = _bbox(mask, pad=1)
    edt = ndi.distance_transform_edt(mask[box])
    ok = edt >= radius_vox
    if max_depth is not None:
        ok &= edt <= max_depth
    cand = np.argwhere(ok)
    if len(cand) == 0:
        return None
    p = cand[rng.integers(len(cand))]
    return tuple(int(p[i] + box[i].start) for i in range(3))


def _ball_alpha(shape, centre, radius_vox: float, rng=None, irregular: float = 0.0,
                elong: tuple = (1.0, 1.0, 1.0)):
    """Fraction of each voxel inside a (lobulated) ellipsoid, in a box around ``centre``.

    Returns ``(box, alpha)``; ``alpha`` float32 in [0, 1] (a 1-voxel linear edge = partial volume).
    """
    r = radius_vox * max(elong) * (1 + irregular) + 2
    lo = [max(int(np.floor(c - r)), 0) for c in centre]
    hi = [min(int(np.ceil(c + r)) + 1, s) for c, s in zip(centre, shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    g = np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)], indexing="ij")
    d = np.sqrt(sum((gi / e) ** 2 for gi, e in zip(g, elong)))
    rad = np.full(d.shape, radius_vox, np.float32)
    if irregular > 0 and rng is not None:
        noise = ndi.gaussian_filter(rng.standard_normal(d.shape).astype(np.float32), 1.5)
        noise /= noise.std() + 1e-6
        rad = rad * (1 + irregular * np.clip(noise, -2, 2) / 2)
    alpha = np.clip(rad - d + 0.5, 0, 1).astype(np.float32)
    return box, alpha


def _paint(case: Case, box, alpha: np.ndarray, value, allowed: np.ndarray, mode: str = "blend"):
    """Blend ``value`` (scalar or array like alpha) into ``case.hu[box]`` where ``allowed``."""
    a = alpha * allowed[box]
    cur = case.hu[box]
    new = cur * (1 - a) + value * a
    case.hu[box] = np.maximum(cur, new) if mode == "max" else new
    out = np.zeros(case.hu.shape, bool)
    out[box] = a >= 0.5
    return out


def _radial_warp(case: Case, centre, scale, r_in: float, r_out: float, axes=(0, 1, 2), box=None):
    """Enlarge everything within ``r_in`` voxels of ``centre`` by ``scale``; tissue between
    ``scale * r_in`` and ``r_out`` is compressed, beyond ``r_out`` nothing moves.

    ``scale`` is a scalar, or an array broadcastable over the box (per-slice scales).
    Edits hu (linear), labels and lesions (nearest) inside ``box`` (default: the r_out cube).
    """
    shape = case.hu.shape
    if box is None:
        box = tuple(slice(max(int(c - r_out), 0), min(int(c + r_out) + 1, s))
                    for c, s in zip(centre, shape))
    box = tuple(slice(max(b.start, 0), min(b.stop, s)) for b, s in zip(box, shape))
    g = np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float32) for b in box], indexing="ij")
    d = [g[i] - centre[i] if i in axes else np.zeros_like(g[i]) for i in range(3)]
    r = np.sqrt(sum(di ** 2 for di in d)) + 1e-6
    s = np.broadcast_to(np.asarray(scale, np.float32), r.shape)
    r_big = s * r_in
    rho = np.where(r <= r_big, r / s,
                   np.where(r >= r_out, r, r_in + (r - r_big) * (r_out - r_in) / np.maximum(r_out - r_big, 1e-3)))
    coords = [g[i] - d[i] + d[i] * rho / r for i in range(3)]
    coords = np.stack(coords)
    case.hu[box] = ndi.map_coordinates(case.hu, coords, order=1, mode="nearest")
    case.labels[box] = ndi.map_coordinates(case.labels, coords, order=0, mode="nearest")
    case.lesions[box] = ndi.map_coordinates(case.lesions, coords, order=0, mode="nearest")


def _enlarge(case: Case, anatomy: str, scale: float) -> np.ndarray:
    """Enlarge an organ by a linear ``scale`` about its centroid (pushing its surroundings
    aside within a 6 mm-wider shell); returns the organ's new mask."""
    pts = np.argwhere(case.mask(anatomy))
    c = pts.mean(0)
    r_in = float(np.sqrt(((pts - c) ** 2).sum(1)).max())
    _radial_warp(case, c, scale, r_in, r_in * scale + 6)
    return case.mask(anatomy)


def _u(rng, rng_pair) -> float:
    lo, hi = rng_pair
    return float(rng.uniform(lo, hi))


def _mm(vox: float, case: Case) -> float:
    return round(float(vox) * case.spacing, 1)


def _eq_diam_mm(mask2d: np.ndarray, spacing: float) -> float:
    return 2.0 * np.sqrt(mask2d.sum() / np.pi) * spacing


# --------------------------------------------------------------------------- lung


def lung_nodule(case: Case, rng, size, hu):
    """Solid pulmonary nodule: a slightly lobulated sphere of ``size`` mm diameter
    (default 10-20 mm) and ``hu`` HU (default 20-60, soft tissue), wholly inside one lobe."""
    lung = case.mask("lung") & case.free()
    d = _u(rng, size)
    while d >= size[0] * 0.7:
        c = _place(lung, d / 2 / case.spacing + 0.5, rng)
        if c is not None:
            break
        d *= 0.85
    else:
        return None
    lobe = int(case.labels[c])
    box, alpha = _ball_alpha(case.hu.shape, c, d / 2 / case.spacing, rng, irregular=0.1)
    v = _u(rng, hu)
    lesion = _paint(case, box, alpha, v, np.isin(case.labels, [lobe]))
    side, lobe_name = LOBE_NAMES[lobe]
    return case.add("lung_nodule", "lung", lesion, size_mm=round(d, 1), hu=round(v), side=side,
                    lobe=lobe_name)


def consolidation(case: Case, rng, size, hu):
    """Airspace consolidation: an irregular patch of ``size`` mm (default 25-50 mm) made of
    overlapping balls, confined to one lobe, at ``hu`` HU (default 20-50) with 8 HU mottle."""
    lung = case.mask("lung")
    lobes = [k for k in LOBE_NAMES if (case.labels == k).sum() > 150]
    if not lobes:
        return None
    lobe = lobes[rng.integers(len(lobes))]
    in_lobe = case.labels == lobe
    d = _u(rng, size)
    c = _place(in_lobe, 2.0, rng) or _place(in_lobe, 1.0, rng)
    if c is None:
        return None
    region = np.zeros(case.hu.shape, np.float32)
    r = d / 2 / case.spacing
    for _ in range(int(rng.integers(3, 6))):
        cc = tuple(ci + rng.normal(0, r / 2) for ci in c)
        box, a = _ball_alpha(case.hu.shape, cc, r * rng.uniform(0.5, 0.8))
        region[box] = np.maximum(region[box], a)
    v = _u(rng, hu)
    tex = v + ndi.gaussian_filter(rng.standard_normal(case.hu.shape).astype(np.float32), 1) * 8
    box = _bbox(region > 0)
    lesion = np.zeros(case.hu.shape, bool)
    sub = _paint(case, box, region[box], tex[box], in_lobe & lung)
    lesion |= sub
    if not lesion.any():
        return None
    side, lobe_name = LOBE_NAMES[lobe]
    ext = np.argwhere(lesion)
    size_mm = _mm((ext.max(0) - ext.min(0) + 1).max(), case)
    return case.add("consolidation", "lung", lesion, size_mm=size_mm, hu=round(v), side=side,
                    lobe=lobe_name)


def pleural_effusion(case: Case, rng, size, hu):
    """Pleural effusion: dependent (posterior, the patient lies supine) fluid of ``size`` mm
    maximal thickness (default 10-30 mm) at ``hu`` HU (default 5-20) replacing the posterior
    lung; left, right or bilateral. The fluid keeps the lung-lobe label (see module doc)."""
    lung = case.mask("lung")
    r = rng.random()
    sides = ["left"] if r < 0.35 else ["right"] if r < 0.7 else ["left", "right"]
    t = _u(rng, size)
    v = _u(rng, hu)
    x = np.arange(case.hu.shape[0])[:, None, None]
    xs = np.nonzero(lung.any((1, 2)))[0]
    x_mid = (xs.min() + xs.max()) / 2.0 if len(xs) else 0
    if case.region == "chest":  # both lungs are in view: split at the middle of the lungs
        left_side = x < x_mid
    else:  # abdomen: split at the aorta (midline)
        ao = case.mask("aorta")
        left_side = x < (np.argwhere(ao)[:, 0].mean() if ao.any() else x_mid)
    fluid = np.zeros(case.hu.shape, bool)
    done = []
    for side in sides:
        part = lung & (left_side if side == "left" else ~left_side)
        if part.sum() < 30:
            continue
        has = part.any(1)                              # [X, Z] columns with lung
        y0 = np.argmax(part, axis=1)                   # most posterior lung voxel per column
        y = np.arange(case.hu.shape[1])[None, :, None]
        f = part & (y < (y0[:, None, :] + t / case.spacing)) & has[:, None, :]
        if f.sum() < 5:
            continue
        fluid |= f
        done.append(side)
    if not done:
        return None
    noise = rng.normal(0, 4, int(fluid.sum())).astype(np.float32)
    case.hu[fluid] = v + noise
    side = done[0] if len(done) == 1 else "bilateral"
    return case.add("pleural_effusion", "lung", fluid, size_mm=round(t, 1), hu=round(v), side=side)


def emphysema(case: Case, rng, size, hu):
    """Emphysema: patchy low-attenuation areas (``hu``, default -990..-960 HU, vs about
    -850 HU normal lung) covering ``size`` percent of the lung (default 20-40 %),
    upper-lobe predominant (centrilobular) when the upper lobes are in view."""
    lung = case.mask("lung")
    if lung.sum() < 100:
        return None
    frac = _u(rng, size) / 100.0
    box = _bbox(lung, pad=1)
    field_ = ndi.gaussian_filter(rng.standard_normal(case.hu[box].shape).astype(np.float32), 1.2)
    field_ /= field_.std() + 1e-6
    upper = np.isin(case.labels[box], [10, 12])
    field_ += 0.8 * upper
    m = lung[box]
    thr = np.quantile(field_[m], 1 - frac)
    low = m & (field_ >= thr)
    v = _u(rng, hu)
    sub = case.hu[box]
    sub[low] = np.minimum(sub[low], v + rng.normal(0, 5, int(low.sum())).astype(np.float32))
    case.hu[box] = sub
    lesion = np.zeros(case.hu.shape, bool)
    lesion[box] = low
    pattern = "centrilobular" if upper[m].mean() > 0.2 else "panlobular"
    return case.add("emphysema", "lung", lesion, diffuse=True, size_mm=None, hu=round(v),
                    extent_pct=round(frac * 100), pattern=pattern)


# --------------------------------------------------------------------------- heart


def cardiomegaly(case: Case, rng, size, hu):
    """Cardiomegaly: the heart and its chambers enlarged by a linear factor ``size``
    (default 1.15-1.30, i.e. 1.5-2.2x the volume) about its centroid, pushing lung and
    mediastinal fat aside; attenuation unchanged (``hu`` unused)."""
    if case.mask("heart").sum() < 500:
        return None
    s = _u(rng, size)
    heart = _enlarge(case, "heart", s)
    xs = np.nonzero(heart.any((1, 2)))[0]
    return case.add("cardiomegaly", "heart", heart, diffuse=True, size_mm=_mm(xs.max() - xs.min() + 1, case),
                    hu=None, scale=round(s, 3))


def pericardial_effusion(case: Case, rng, size, hu):
    """Pericardial effusion: a circumferential fluid rim of ``size`` mm (default 8-20 mm) at
    ``hu`` HU (default 10-25) around the heart, replacing epicardial fat and adjacent lung,
    not bone, liver or enhanced vessels. The rim is labelled heart (see module doc)."""
    heart = case.mask("heart")
    if heart.sum() < 500:
        return None
    t = _u(rng, size)
    n = max(int(round(t / case.spacing)), 1)
    inplane = np.zeros((3, 3, 3), bool)
    inplane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    box = _bbox(heart, pad=n + 1)
    h = heart[box]
    rim = ndi.binary_dilation(h, inplane, iterations=n) & ~h
    lab = case.labels[box]
    soft = (case.hu[box] < 40) | np.isin(lab, ANATOMY_IDS["lung"])
    rim &= soft & ~np.isin(lab, [TS["aorta"], TS["trachea"]])
    if rim.sum() < 20:
        return None
    v = _u(rng, hu)
    sub = case.hu[box]
    sub[rim] = v + rng.normal(0, 4, int(rim.sum())).astype(np.float32)
    case.hu[box] = sub
    lab[rim] = TS["heart"]
    case.labels[box] = lab
    lesion = np.zeros(case.hu.shape, bool)
    lesion[box] = rim
    return case.add("pericardial_effusion", "heart", lesion, size_mm=round(t, 1), hu=round(v))


# --------------------------------------------------------------------------- aorta


def arterial_wall_calcification(case: Case, rng, size, hu):
    """Aortic wall calcification: 8-20 plaques of ``size`` mm (default 3-9 mm) along the
    aortic wall (the outer voxel layer of the aorta mask) at ``hu`` HU (default 500-1000),
    never darker than the lumen."""
    ao = case.mask("aorta")
    if ao.sum() < 50:
        return None
    inplane = np.zeros((3, 3, 3), bool)
    inplane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    wall = ao & ~ndi.binary_erosion(ao, inplane)
    pts = np.argwhere(wall & case.free())
    if len(pts) == 0:
        return None
    n = int(rng.integers(8, 21))
    lesion = np.zeros(ao.shape, bool)
    largest = 0.0
    v = _u(rng, hu)
    for p in pts[rng.choice(len(pts), size=min(n, len(pts)), replace=False)]:
        L = _u(rng, size)
        largest = max(largest, L)
        r = L / 2 / case.spacing
        box = tuple(slice(max(int(pi - r - 1), 0), int(pi + r + 2)) for pi in p)
        g = np.meshgrid(*[np.arange(b.start, min(b.stop, s)) for b, s in zip(box, ao.shape)], indexing="ij")
        near = sum((gi - pi) ** 2 for gi, pi in zip(g, p)) <= max(r, 0.5) ** 2
        plaque = near & wall[box]
        lesion[box] |= plaque
    vals = v + rng.normal(0, 60, int(lesion.sum())).astype(np.float32)
    case.hu[lesion] = np.maximum(case.hu[lesion], vals)
    segment = "thoracic" if case.region == "chest" else "abdominal"
    return case.add("arterial_wall_calcification", "aorta", lesion, size_mm=round(largest, 1),
                    hu=round(v), count=int(min(n, len(pts))), segment=segment)


def aortic_aneurysm(case: Case, rng, size, hu):
    """Fusiform aortic aneurysm: a segment of the aorta dilated to ``size`` mm maximal
    diameter (default 40-60 mm; normal about 20 mm abdominal, 30-35 mm ascending) over a
    length of about 1.5 diameters, lumen attenuation unchanged (``hu`` unused). Abdomen:
    the infrarenal aorta; chest: the ascending aorta."""
    ao = case.mask("aorta")
    zs = np.nonzero(ao.any((0, 1)))[0]
    if len(zs) < 8:
        return None
    per_slice = {}
    for z in zs:
        lab, n = ndi.label(ao[:, :, z])
        if n == 0:
            continue
        comps = [np.argwhere(lab == i) for i in range(1, n + 1)]
        if case.region == "chest":
            comp = max(comps, key=lambda p: p[:, 1].mean())  # ascending = anterior
        else:
            comp = max(comps, key=len)
        per_slice[int(z)] = comp
    if case.region == "chest":
        # ascending aorta: slices where two aortic cross-sections exist (ascending + descending)
        cand = [z for z in per_slice if ndi.label(ao[:, :, z])[1] >= 2]
        cand = sorted(z for z in cand if per_slice[z][:, 1].mean() > ao.shape[1] * 0.45)
        cand = cand[: max(3, int(len(cand) * 0.6))]  # keep below the arch
    else:
        lo, hi = zs.min(), zs.min() + 0.55 * (zs.max() - zs.min())  # infrarenal part
        cand = [z for z in per_slice if lo + 2 <= z <= hi]
    if len(cand) < 3:
        return None
    z0 = int(rng.choice(cand))
    D = _u(rng, size)
    d0 = _eq_diam_mm(np.ones(len(per_slice[z0])), case.spacing)
    s_max = max(D / d0, 1.05)
    half = 0.75 * D / case.spacing
    done = []
    for z in range(int(z0 - half), int(z0 + half) + 1):
        if z not in per_slice:
            continue
        w = np.cos(np.pi / 2 * (z - z0) / half) ** 2
        s = 1 + (s_max - 1) * w
        if s < 1.02:
            continue
        comp = per_slice[z]
        c = comp.mean(0)
        r_in = float(np.sqrt(((comp[:, :2] - c[:2]) ** 2).sum(1)).max()) + 0.5
        r_out = r_in * s + 4
        box = (slice(max(int(c[0] - r_out), 0), int(c[0] + r_out) + 1),
               slice(max(int(c[1] - r_out), 0), int(c[1] + r_out) + 1), slice(z, z + 1))
        _radial_warp(case, (c[0], c[1], z), s, r_in, r_out, axes=(0, 1), box=box)
        done.append(z)
    if not done:
        return None
    lesion = np.zeros(ao.shape, bool)
    ao2 = case.mask("aorta")
    diam = 0.0
    for z in done:
        lab, n = ndi.label(ao2[:, :, z])
        c = per_slice[z].mean(0)
        i = lab[int(round(c[0])), int(round(c[1]))]
        if i == 0:
            continue
        lesion[:, :, z] = lab == i
        diam = max(diam, _eq_diam_mm(lab == i, case.spacing))
    if not lesion.any():
        return None
    segment = "ascending" if case.region == "chest" else "infrarenal abdominal"
    return case.add("aortic_aneurysm", "aorta", lesion, size_mm=round(float(diam), 1), hu=None, segment=segment)


# --------------------------------------------------------------------------- liver


def _liver_lobe(case: Case, c) -> str:
    liver = np.argwhere(case.mask("liver"))
    # the right lobe holds most of the liver; the left lobe is the part towards patient-left
    cut = np.quantile(liver[:, 0], 0.3)
    return "right" if c[0] >= cut else "left"


def hepatic_steatosis(case: Case, rng, size, hu):
    """Hepatic steatosis: the whole liver darker by ``hu`` HU (default -45..-25, to about
    5-25 HU on this non-contrast scan, below the spleen); ``size`` unused."""
    liver = case.mask("liver")
    if liver.sum() < 500:
        return None
    dv = _u(rng, hu)
    case.hu[liver] += dv
    mean = float(case.hu[liver].mean())
    spl = case.mask("spleen")
    spleen_hu = round(float(case.hu[spl].mean())) if spl.sum() > 30 else None
    return case.add("hepatic_steatosis", "liver", liver, diffuse=True, size_mm=None, hu=round(dv),
                    liver_hu=round(mean), spleen_hu=spleen_hu)


def _focal_lesions(case, rng, finding, anatomy, allowed, size, hu, count, irregular, texture,
                   depth=None):
    """1..``count`` balls inside ``allowed``; returns (lesion mask, sizes, value, centre)."""
    lesion = np.zeros(case.hu.shape, bool)
    sizes = []
    v = _u(rng, hu)
    first = None
    for _ in range(count):
        d = _u(rng, size)
        r = d / 2 / case.spacing
        c = None
        while d >= size[0] * 0.7:
            c = _place(allowed & ~lesion, r + 0.5 if depth is None else 1.0, rng,
                       max_depth=None if depth is None else max(depth * r, 1.0))
            if c is not None:
                break
            d *= 0.85
            r = d / 2 / case.spacing
        if c is None:
            break
        elong = tuple(rng.uniform(0.85, 1.15, 3))
        box, alpha = _ball_alpha(case.hu.shape, c, r, rng, irregular=irregular, elong=elong)
        val = v
        if texture:
            val = v + ndi.gaussian_filter(rng.standard_normal(alpha.shape).astype(np.float32), 1) * texture
        lesion |= _paint(case, box, alpha, val, allowed)
        sizes.append(round(d, 1))
        first = first or c
    return lesion, sizes, v, first


def hepatic_cyst(case: Case, rng, size, hu):
    """Simple hepatic cyst(s): 1-2 sharply marginated round lesions of ``size`` mm (default
    15-30 mm) at water attenuation ``hu`` (default 0-10 HU; liver about 50 HU)."""
    liver = case.mask("liver")
    lesion, sizes, v, c = _focal_lesions(case, rng, "hepatic_cyst", "liver", liver & case.free(),
                                         size, hu, int(rng.integers(1, 3)), 0.0, 0)
    if not sizes or not lesion.any():
        return None
    return case.add("hepatic_cyst", "liver", lesion, size_mm=max(sizes), hu=round(v), count=len(sizes),
                    lobe=_liver_lobe(case, c))


def liver_mass(case: Case, rng, size, hu):
    """Solid liver mass (metastasis / HCC pattern): a lobulated, heterogeneous lesion of
    ``size`` mm (default 25-45 mm) at ``hu`` HU (default 10-25, with 8 HU mottle), i.e.
    ill-defined hypoattenuation against the liver."""
    liver = case.mask("liver")
    lesion, sizes, v, c = _focal_lesions(case, rng, "liver_mass", "liver", liver & case.free(),
                                         size, hu, 1, 0.25, 8)
    if not sizes or not lesion.any():
        return None
    return case.add("liver_mass", "liver", lesion, size_mm=max(sizes), hu=round(v), count=1,
                    lobe=_liver_lobe(case, c))


# --------------------------------------------------------------------------- kidney, spleen, gallbladder


def renal_cyst(case: Case, rng, size, hu):
    """Cortical renal cyst: a round lesion of ``size`` mm (default 20-35 mm) at ``hu`` HU
    (default 0-10), centred near the renal surface so it bulges into the perirenal fat
    (the sample kidney is only 10-20 HU unenhanced, so the exophytic contour and the
    fat it displaces carry most of the contrast). Its voxels get TotalSegmentator's
    kidney_cyst_<side> id."""
    side = "left" if rng.random() < 0.5 else "right"
    kid = case.labels == TS[f"kidney_{side}"]
    if kid.sum() < 200:
        side = "right" if side == "left" else "left"
        kid = case.labels == TS[f"kidney_{side}"]
        if kid.sum() < 200:
            return None
    d = _u(rng, size)
    r = d / 2 / case.spacing
    c = _place(kid & case.free(), 1.0, rng, max_depth=max(r * 0.5, 1.5)) \
        or _place(kid & case.free(), 1.0, rng)
    if c is None:
        return None
    allowed = kid | ((case.labels == 0) & (case.hu > -250) & (case.hu < 120))
    box, alpha = _ball_alpha(case.hu.shape, c, r, rng, irregular=0.0)
    v = _u(rng, hu)
    lesion = _paint(case, box, alpha, v, allowed)
    case.labels[lesion] = TS[f"kidney_cyst_{side}"]
    return case.add("renal_cyst", "kidney", lesion, size_mm=round(d, 1), hu=round(v), side=side, count=1)


def nephrolithiasis(case: Case, rng, size, hu):
    """Renal calculi: 1-3 stones of ``size`` mm (default 5-12 mm) at ``hu`` HU (default
    400-1200), central in the kidney (renal sinus / collecting system); one side or both."""
    n = int(rng.integers(1, 4))
    if rng.random() < 0.2:  # bilateral
        stone_sides = ["left", "right"] + [("left", "right")[rng.integers(2)] for _ in range(n - 2)]
    else:
        stone_sides = [("left", "right")[rng.integers(2)]] * n
    lesion = np.zeros(case.hu.shape, bool)
    sizes = []
    v = _u(rng, hu)
    done = []
    for side in stone_sides:
        kid = (case.labels == TS[f"kidney_{side}"]) & case.free()
        c = _place(kid & ~lesion, 2.0, rng)
        if c is None:
            continue
        d = _u(rng, size)
        box, alpha = _ball_alpha(case.hu.shape, c, d / 2 / case.spacing)
        alpha[tuple(ci - b.start for ci, b in zip(c, box))] = 1.0  # a stone always fills its centre voxel
        lesion |= _paint(case, box, alpha, v, kid, mode="max")
        sizes.append(round(d, 1))
        if side not in done:
            done.append(side)
    if not sizes:
        return None
    side = done[0] if len(done) == 1 else "bilateral"
    return case.add("nephrolithiasis", "kidney", lesion, size_mm=max(sizes), hu=round(v), side=side,
                    count=len(sizes))


def splenomegaly(case: Case, rng, size, hu):
    """Splenomegaly: the spleen enlarged by a linear factor ``size`` (default 1.25-1.45,
    i.e. 2-3x the volume; craniocaudal length well over 13 cm) about its centroid;
    attenuation unchanged (``hu`` unused)."""
    if case.mask("spleen").sum() < 500:
        return None
    s = _u(rng, size)
    spl = _enlarge(case, "spleen", s)
    ext = np.argwhere(spl)
    length = _mm((ext.max(0) - ext.min(0) + 1).max(), case)
    return case.add("splenomegaly", "spleen", spl, diffuse=True, size_mm=length, hu=None, scale=round(s, 3))


def gallstones(case: Case, rng, size, hu):
    """Calcified gallstones: 1-3 stones of ``size`` mm (default 5-15 mm) at ``hu`` HU
    (default 200-600), layering in the dependent (posterior) gallbladder."""
    gb = case.mask("gallbladder") & case.free()
    if gb.sum() < 30:
        return None
    y = np.arange(gb.shape[1])[None, :, None]
    ys = np.nonzero(gb.any((0, 2)))[0]
    dependent = gb & (y <= ys.min() + 0.5 * (ys.max() - ys.min()))
    lesion, sizes, v, c = _focal_lesions(case, rng, "gallstones", "gallbladder", dependent, size, hu,
                                         int(rng.integers(1, 4)), 0.1, 0)
    if not sizes:
        lesion, sizes, v, c = _focal_lesions(case, rng, "gallstones", "gallbladder", gb,
                                             (3.0, size[0]), hu, 1, 0.0, 0)
    if not sizes or not lesion.any():
        return None
    return case.add("gallstones", "gallbladder", lesion, size_mm=max(sizes), hu=round(v), count=len(sizes))


@dataclass(frozen=True)
class FindingType:
    """A finding the generator can insert: its fvlm54 ``id`` and ``anatomy``, the
    templates (``regions``) whose field of view holds it, its insertion order (``stage``:
    0 shape changes, 1 diffuse, 2 fluid, 3 focal) and preset defaults."""

    id: str
    anatomy: str
    regions: tuple
    stage: int
    insert: Callable
    size: tuple
    hu: tuple


FINDINGS: dict[str, FindingType] = {f.id: f for f in [
    FindingType("cardiomegaly", "heart", ("chest",), 0, cardiomegaly, (1.15, 1.30), (0, 0)),
    FindingType("splenomegaly", "spleen", ("abdomen",), 0, splenomegaly, (1.25, 1.45), (0, 0)),
    FindingType("aortic_aneurysm", "aorta", ("chest", "abdomen"), 0, aortic_aneurysm, (40, 60), (0, 0)),
    FindingType("hepatic_steatosis", "liver", ("abdomen",), 1, hepatic_steatosis, (0, 0), (-45, -25)),
    FindingType("emphysema", "lung", ("chest", "abdomen"), 1, emphysema, (20, 40), (-990, -960)),
    FindingType("pleural_effusion", "lung", ("chest", "abdomen"), 2, pleural_effusion, (10, 30), (5, 20)),
    FindingType("pericardial_effusion", "heart", ("chest",), 2, pericardial_effusion, (8, 20), (10, 25)),
    FindingType("consolidation", "lung", ("chest", "abdomen"), 3, consolidation, (25, 50), (20, 50)),
    FindingType("lung_nodule", "lung", ("chest", "abdomen"), 3, lung_nodule, (10, 20), (20, 60)),
    FindingType("arterial_wall_calcification", "aorta", ("chest", "abdomen"), 3,
                arterial_wall_calcification, (3, 9), (500, 1000)),
    FindingType("hepatic_cyst", "liver", ("abdomen",), 3, hepatic_cyst, (15, 30), (0, 10)),
    FindingType("liver_mass", "liver", ("abdomen",), 3, liver_mass, (25, 45), (10, 25)),
    FindingType("renal_cyst", "kidney", ("abdomen",), 3, renal_cyst, (20, 35), (0, 10)),
    FindingType("nephrolithiasis", "kidney", ("abdomen",), 3, nephrolithiasis, (5, 12), (400, 1200)),
    FindingType("gallstones", "gallbladder", ("abdomen",), 3, gallstones, (5, 15), (200, 600)),
]}
