"""TotalSegmentator label maps for a case: run TotalSegmentator, or read precomputed masks.

The label map returned is in TotalSegmentator ids of the declared class map
(``masks.class_map``: v2 117 classes, v1 104) on the image's canonical grid.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np

from fvlm.anatomy import CLASS_MAP_VERSIONS, load_class_map
from fvlm.resources import totalsegmentator_weights_dir

from .errors import CaseError
from .geometry import to_canonical
from .load import load_nifti

__all__ = ["ts_available", "run_totalsegmentator", "load_precomputed", "check_labels", "detect_class_map",
           "NO_WEIGHTS_HINT", "NO_MASK_REASON"]

NO_WEIGHTS_HINT = ("TotalSegmentator weights are not installed locally (checked TOTALSEG_WEIGHTS_PATH, "
                   "TOTALSEG_HOME_DIR and ~/.totalsegmentator; download them once with "
                   "`totalseg_download_weights -t total` on a machine with internet)")


#: the per-case error when a case has no label map (check_masks says it once per run first)
NO_MASK_REASON = ("no anatomy mask for this case: none was given or found under --masks / the input's "
                  "segmentation folder, and " + NO_WEIGHTS_HINT + " (or set masks.source=none for whole volumes only)")


def ts_available() -> bool:
    """True when TotalSegmentator is importable and its weights are on disk (never downloads)."""
    if totalsegmentator_weights_dir() is None:
        return False
    try:
        import totalsegmentator.python_api  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


def ts_version() -> str:
    try:
        return importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_totalsegmentator(arr_ras: np.ndarray, affine_ras: np.ndarray, task: str, fast: bool,
                         device: str) -> np.ndarray:
    """Segment a canonical (RAS) HU volume with TotalSegmentator's Python API; returns TS ids."""
    if totalsegmentator_weights_dir() is None:
        raise CaseError("mask", NO_WEIGHTS_HINT)
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    img = nib.Nifti1Image(np.asarray(arr_ras, dtype=np.int16), affine_ras)
    try:
        seg = totalsegmentator(img, None, ml=True, task=task, fast=fast, quiet=True, device=device)
    except Exception as e:  # noqa: BLE001 - surface any TotalSegmentator failure as a case error
        raise CaseError("mask", f"TotalSegmentator failed: {type(e).__name__}: {e}") from None
    lab = np.asanyarray(seg.dataobj)
    if lab.shape != arr_ras.shape:
        lab, _, _ = to_canonical(lab, seg.affine, "RAS")
    return np.ascontiguousarray(lab).astype(np.uint8)


def _grid_check(name: str, shape_img, aff_img, shape_m, aff_m, tol_mm: float) -> None:
    if tuple(shape_m) != tuple(shape_img):
        raise CaseError("mask", f"{name}: mask shape {tuple(shape_m)} does not match image shape {tuple(shape_img)} "
                                "(after reorienting both to RAS)")
    # compare the world positions of the grid corners
    corners = np.array([[0, 0, 0, 1], [shape_img[0] - 1, shape_img[1] - 1, shape_img[2] - 1, 1]], dtype=float).T
    d = np.abs(aff_img @ corners - aff_m @ corners)[:3].max()
    if d > tol_mm:
        raise CaseError("mask", f"{name}: mask and image grids differ by up to {d:.1f} mm in world space "
                                f"(tolerance {tol_mm} mm); the mask does not belong to this image")


def check_labels(lab: np.ndarray, class_map: str, name: str) -> None:
    """Labels must be integers within the declared TotalSegmentator class map."""
    n = CLASS_MAP_VERSIONS[class_map][0]
    mx = int(lab.max()) if lab.size else 0
    if mx > n:
        other = [v for v, (k, _) in CLASS_MAP_VERSIONS.items() if k >= mx and v != class_map]
        hint = f"; set masks.class_map={other[0]}" if other else ""
        raise CaseError("mask", f"{name}: label {mx} found but TotalSegmentator class map {class_map} has "
                                f"{n} classes{hint}")


def _load_label_file(path: Path, preloaded=None, blank_affine=None):
    """A label file as uint8 and its affine; a blank header takes ``blank_affine`` (the geometry
    assumed for its image, e.g. CT-RATE v1: LPS + metadata spacing) when one is given."""
    v = preloaded if preloaded is not None else load_nifti(path, want_hash=False)
    a = v.array
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.array_equal(a, np.rint(a)):
            raise CaseError("mask", f"{path.name}: mask holds non-integer values")
    if a.min() < 0 or a.max() > 255:
        raise CaseError("mask", f"{path.name}: mask values must lie in 0..255, found {a.min()}..{a.max()}")
    aff = v.affine
    if v.blank_header and blank_affine is not None:
        aff = np.asarray(blank_affine, dtype=np.float64)
    return a.astype(np.uint8), aff


#: label-id ranges that tell the two class maps apart on a chest CT: v2 ids 10-12 are lung lobes
#: (v1: pancreas and adrenals), v1 ids 15-17 are the right lung lobes (v2: esophagus, trachea, thyroid)
_V2_LUNG, _V1_LUNG = slice(10, 13), slice(15, 18)


def detect_class_map(mask: str | None, mask_dir: str | None) -> tuple[str | None, str]:
    """Which TotalSegmentator class map a label map uses: ``("v2"|"v1"|None, why)``.

    A multilabel file: an id above 104 means v2; else lung lobes decide (v2 puts them at
    10-14, v1 at 13-17; the other map's classes at those ids are small organs), so the id
    range holding 5x more voxels wins. A folder of class files: the class names.
    """
    if mask_dir:
        names = {f.name.split(".nii")[0] for f in Path(mask_dir).glob("*.nii*")}
        v1, v2 = set(load_class_map("v1").values()), set(load_class_map("v2").values())
        if names and names <= v2 and not names <= v1:
            return "v2", f"class files {sorted(names - v1)[:2]} exist only in v2"
        if names and names <= v1 and not names <= v2:
            return "v1", f"class files {sorted(names - v2)[:2]} exist only in v1"
        return None, "class file names fit both maps"
    try:
        a, _ = _load_label_file(Path(mask))
    except CaseError as e:
        raise CaseError("mask", e.reason) from None
    counts = np.bincount(a.ravel(), minlength=256)
    top = int(np.nonzero(counts)[0].max()) if counts[1:].any() else 0
    if top > CLASS_MAP_VERSIONS["v1"][0]:
        return "v2", f"label {top} is above v1's {CLASS_MAP_VERSIONS['v1'][0]} classes"
    sides = _side_votes(a)
    if sides is not None:
        (best, sb), (other, so) = sorted(sides.items(), key=lambda kv: -kv[1])
        if sb > 0 and sb > 2 * max(so, 0) + 100:
            return best, f"left/right classes lie on the spleen/liver side under {best} ids"
    lo, hi = int(counts[_V2_LUNG].sum()), int(counts[_V1_LUNG].sum())
    if lo > 5 * hi and lo > 1000:
        return "v2", "lung lobes at ids 10-14"
    if hi > 5 * lo and hi > 1000:
        return "v1", "lung lobes at ids 13-17"
    return None, "no lungs to tell v1 from v2"


def _side_votes(a: np.ndarray, step: int = 2) -> dict | None:
    """Per class map, voxels of ``*_left``/``*_right`` classes on the side their name says (minus
    those on the other side); the liver (id 5) marks the patient's right, the spleen (1) the left,
    in both maps. None when either is missing."""
    s = a[::step, ::step, ::step]
    flat = s.ravel()
    n = np.bincount(flat, minlength=256).astype(np.float64)
    if n[1] < 20 or n[5] < 20:
        return None
    cen = np.zeros((256, 3))
    for ax in range(3):
        shape = [1, 1, 1]
        shape[ax] = s.shape[ax]
        coord = np.broadcast_to(np.arange(s.shape[ax], dtype=np.float64).reshape(shape), s.shape).ravel()
        cen[:, ax] = np.bincount(flat, weights=coord, minlength=256) / np.maximum(n, 1)
    axis = cen[5] - cen[1]                                  # towards the patient's right
    mid = 0.5 * (cen[5] + cen[1])
    out = {}
    for ver in ("v2", "v1"):
        score = 0.0
        for i, name in load_class_map(ver).items():
            if i in (1, 5) or n[i] == 0 or not name.endswith(("_left", "_right")):
                continue
            p = float((cen[i] - mid) @ axis)
            score += n[i] if (p > 0) == name.endswith("_right") else -n[i]
        out[ver] = score
    return out


def load_precomputed(mask: str | None, mask_dir: str | None, shape_ras, affine_ras, orientation: str,
                     class_map: str, tol_mm: float, preloaded=None, blank_affine=None) -> np.ndarray:
    """Read a multilabel NIfTI (TS ids) or a folder of ``<class>.nii.gz`` binary masks onto the image grid.

    ``blank_affine``: the voxel->world affine the image was given (file voxel order); a mask
    file with a blank header gets it too, as such a mask was saved in its image's voxel order.
    """
    if mask:
        p = Path(mask)
        if not p.exists():
            raise CaseError("mask", f"mask not found: {p.name}")
        a, aff = _load_label_file(p, preloaded, blank_affine)
        lab, aff_c, _ = to_canonical(a, aff, orientation)
        _grid_check(p.name, shape_ras, affine_ras, lab.shape, aff_c, tol_mm)
        check_labels(lab, class_map, p.name)
        return lab
    d = Path(mask_dir)
    if not d.is_dir():
        raise CaseError("mask", f"mask folder not found: {d.name}")
    ids = {v: k for k, v in load_class_map(class_map).items()}
    files = sorted(list(d.glob("*.nii.gz")) + list(d.glob("*.nii")))
    if not files:
        raise CaseError("mask", f"{d.name}: no .nii/.nii.gz masks in the folder")
    unknown = [f.name for f in files if f.name.split(".nii")[0] not in ids]
    if unknown:
        raise CaseError("mask", f"{d.name}: {len(unknown)} mask file(s) are not TotalSegmentator {class_map} "
                                f"class names: {', '.join(unknown[:5])}")
    lab = np.zeros(tuple(shape_ras), np.uint8)
    for f in files:  # in name order; a voxel claimed by two classes keeps the later one
        a, aff = _load_label_file(f, None, blank_affine)
        m, aff_c, _ = to_canonical(a, aff, orientation)
        _grid_check(f.name, shape_ras, affine_ras, m.shape, aff_c, tol_mm)
        lab[np.asarray(m) > 0] = ids[f.name.split(".nii")[0]]
    return lab
