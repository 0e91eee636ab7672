"""Source anatomies of the demo corpus: the two real CT samples, on one 3 mm RAS grid.

Two templates, each a real CT with a multilabel mask in TotalSegmentator v2 ids:

- ``abdomen``: ``example_ct`` (non-contrast, lung bases to proximal femurs, 3 mm) with
  the TotalSegmentator segmentation ``example_seg_fast_force_split`` (used as shipped).
- ``chest``: the chest CT angiogram ``aorta_report/ct_cropped`` (1.5 mm, LPS) reoriented to
  RAS and 2x2x2 block-averaged to 3 mm, with the shipped aorta mask. Its heart, lung-lobe
  and trachea labels are **derived here by thresholds and geometry, not by TotalSegmentator**
  (see :func:`derive_chest_labels`); the lungs are cut by the field of view laterally.

:func:`vary_template` makes anatomy-preserving variants (small rotation and scaling).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..resources import samples_dir

SPACING_MM = 3.0
AIR_HU = -1000

# TotalSegmentator v2 ids used by the demo (class_map_total_v2.json).
TS = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5,
    "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "trachea": 16,
    "kidney_cyst_left": 23, "kidney_cyst_right": 24, "heart": 51, "aorta": 52,
}

#: fvlm54 anatomy id -> TotalSegmentator v2 ids (the groups of the fvlm54 taxonomy).
ANATOMY_IDS = {
    "lung": (10, 11, 12, 13, 14),
    "heart": (51, 61),
    "aorta": (52,),
    "liver": (5,),
    "gallbladder": (4,),
    "spleen": (1,),
    "kidney": (2, 3, 23, 24),
}


@dataclass
class Template:
    """One source anatomy: ``hu`` int16 ``[X, Y, Z]`` (RAS, 3 mm) and ``labels`` uint8 (TS v2 ids)."""

    region: str            # "abdomen" or "chest"
    hu: np.ndarray
    labels: np.ndarray
    contrast: str          # "non-contrast" or "arterial"
    origin: np.ndarray     # world position (RAS mm) of voxel [0, 0, 0]


def _load_ras(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Array in RAS order, its spacing (mm) and origin (RAS mm)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), np.diag(img.affine)[:3], img.affine[:3, 3].copy()


def _block_mean(a: np.ndarray, f: int = 2) -> np.ndarray:
    X, Y, Z = (s // f * f for s in a.shape)
    a = a[:X, :Y, :Z].astype(np.float32)
    return a.reshape(X // f, f, Y // f, f, Z // f, f).mean((1, 3, 5))


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def derive_chest_labels(hu: np.ndarray, aorta: np.ndarray) -> np.ndarray:
    """Heart, lung lobes and trachea for the chest CTA, by thresholds and geometry.

    Args:
        hu: float ``[X, Y, Z]`` HU on a 3 mm RAS grid (contrast-enhanced CTA).
        aorta: bool, same shape (the shipped aorta mask).
    Returns:
        uint8 labels in TotalSegmentator v2 ids (51 heart, 52 aorta, 10-14 lobes, 16 trachea).

    Heart: the contrast-filled (> 180 HU) blood pool connected to the left ventricle, below
    the aortic root + 24 mm, opened to drop vessels, then grown in-plane by 9 mm into
    soft tissue (myocardium) and hole-filled. Lungs: air (< -400 HU) components above the
    upper-abdominal air; the trachea is pure air (< -950 HU) grown from a small central
    blob in the top slice within a narrow tube. Lobes: left/right by the lungs' own components; an oblique plane through the
    lung centroid (descending anteriorly) splits upper from lower lobe and, on the right,
    the anterior-inferior part of the upper region is the middle lobe. These are
    approximations for a demo, not TotalSegmentator output.
    """
    labels = np.zeros(hu.shape, np.uint8)
    aorta = aorta.astype(bool)
    inplane = np.zeros((3, 3, 3), bool)
    inplane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    heart = _heart(hu, aorta, inplane)
    lung_all, x_mid = _lungs(hu, heart)
    x, y, z = np.indices(hu.shape)
    trachea = _trachea(hu, lung_all, x_mid, inplane, x, y)
    _lobes(labels, lung_all & ~trachea, x_mid, x, y, z)
    labels[trachea] = TS["trachea"]
    labels[heart] = TS["heart"]
    labels[aorta] = TS["aorta"]
    return labels


def _heart(hu: np.ndarray, aorta: np.ndarray, inplane: np.ndarray) -> np.ndarray:
    """The contrast-filled blood pool below the aortic root, grown in-plane into the myocardium."""
    asc = aorta.copy()
    asc[:, : hu.shape[1] // 2, :] = False  # ascending aorta lies anterior
    z_root = int(np.nonzero(asc.any((0, 1)))[0].min())
    blood = (hu > 180) & ~aorta
    blood[:, :, z_root + 8:] = False
    core = ndi.binary_opening(blood, iterations=2)
    core = _largest(core)
    heart = ndi.binary_dilation(core, inplane, iterations=3) & (hu > -150) & (hu < 1000) & ~aorta
    heart = ndi.binary_closing(heart, iterations=1)
    return np.stack([ndi.binary_fill_holes(heart[:, :, z]) for z in range(hu.shape[2])], -1) & ~aorta


def _lungs(hu: np.ndarray, heart: np.ndarray) -> tuple[np.ndarray, float]:
    """Air components above the upper-abdominal air (trachea included) and the midline x."""
    air = (hu < -400) & ~heart
    lab, n = ndi.label(air)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    z_heart_lo = int(np.nonzero(heart.any((0, 1)))[0].min())
    keep = [i for i in np.nonzero(sizes > 1000)[0]
            if np.nonzero((lab == i).any((0, 1)))[0].max() > z_heart_lo + 5]
    lung_all = np.isin(lab, keep)
    xs = np.nonzero(lung_all.any((1, 2)))[0]
    return lung_all, (xs.min() + xs.max()) / 2.0


def _trachea(hu: np.ndarray, lung_all: np.ndarray, x_mid: float, inplane: np.ndarray, x: np.ndarray,
             y: np.ndarray) -> np.ndarray:
    """Pure air (< -950 HU) grown from a small central air blob in the top slice, kept within a
    tube around it so the main bronchi and the lungs stay out."""
    trachea = np.zeros_like(lung_all)
    top = hu.shape[2] - 1
    sl, n = ndi.label((hu[:, :, top] < -950) & lung_all[:, :, top])
    best = None
    for i in range(1, n + 1):
        comp = np.argwhere(sl == i)
        if 8 <= len(comp) <= 80 and abs(comp[:, 0].mean() - x_mid) < 10:
            if best is None or abs(comp[:, 0].mean() - x_mid) < abs(best[0] - x_mid):
                best = comp.mean(0)
    if best is not None:
        tube = (np.abs(x - best[0]) <= 5) & (np.abs(y - best[1]) <= 8) & (hu < -950) & lung_all
        tl, _ = ndi.label(tube)
        seed = tl[int(round(best[0])), int(round(best[1])), top]
        if seed:
            trachea = ndi.binary_dilation(tl == seed, inplane) & lung_all
    return trachea


def _lobes(labels: np.ndarray, lungs: np.ndarray, x_mid: float, x: np.ndarray, y: np.ndarray,
           z: np.ndarray) -> None:
    """Write the lobes into ``labels``: left/right of the midline, an oblique plane through each
    lung's centroid (descending anteriorly) for upper/lower, the right middle lobe anterior-inferior."""
    for side in ("left", "right"):
        part = lungs & ((x < x_mid) if side == "left" else (x >= x_mid))
        if not part.any():
            continue
        cy, cz = np.argwhere(part).mean(0)[1:]
        # oblique fissure: descends anteriorly (higher y -> lower z)
        lower = part & (z - cz < -(y - cy) * 0.9)
        upper = part & ~lower
        if side == "left":
            labels[upper] = TS["lung_upper_lobe_left"]
            labels[lower] = TS["lung_lower_lobe_left"]
        else:
            middle = upper & (z < cz) & (y > cy)
            labels[upper & ~middle] = TS["lung_upper_lobe_right"]
            labels[middle] = TS["lung_middle_lobe_right"]
            labels[lower] = TS["lung_lower_lobe_right"]


@functools.lru_cache(maxsize=1)
def load_templates() -> dict[str, Template]:
    """The two source templates (cached; arrays must be copied before editing)."""
    d = samples_dir() / "ct"
    hu, sp, origin = _load_ras(d / "example_ct.nii.gz")
    seg, _, _ = _load_ras(d / "example_seg_fast_force_split.nii.gz")
    if not np.allclose(sp, SPACING_MM):
        raise RuntimeError(f"example_ct spacing {sp} is not {SPACING_MM} mm")
    abdomen = Template("abdomen", np.clip(hu, -1024, 3071).astype(np.int16),
                       seg.astype(np.uint8), "non-contrast", origin)
    cta, sp, origin = _load_ras(d / "aorta_report" / "ct_cropped.nii.gz")
    ao, _, _ = _load_ras(d / "aorta_report" / "aorta.nii.gz")
    f = int(round(SPACING_MM / float(sp[0])))
    chu = _block_mean(cta, f)
    caorta = _block_mean(ao, f) >= 0.5
    chest = Template("chest", np.clip(np.round(chu), -1024, 3071).astype(np.int16),
                     derive_chest_labels(chu, caorta), "arterial",
                     origin + (f - 1) / 2.0 * sp)  # centre of the first block
    return {"abdomen": abdomen, "chest": chest}


def vary_template(t: Template, rng: np.random.Generator, max_rot_deg: float = 4.0,
                  max_scale: float = 0.05) -> Template:
    """A small random rotation (about every axis, most about z) and isotropic scaling.

    Anatomy-preserving: no flips, so laterality stays true. HU trilinear, labels nearest.
    """
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-1, 1, 3) * np.array([0.4, 0.4, 1.0]) * max_rot_deg
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    s = 1.0 + rng.uniform(-max_scale, max_scale)
    mat = rot / s  # output -> source
    c = (np.array(t.hu.shape) - 1) / 2.0
    off = c - mat @ c
    hu = ndi.affine_transform(t.hu.astype(np.float32), mat, off, order=1, mode="constant", cval=AIR_HU)
    lab = ndi.affine_transform(t.labels, mat, off, order=0, mode="constant", cval=0)
    return Template(t.region, np.round(hu).astype(np.int16), lab.astype(np.uint8), t.contrast, t.origin)
