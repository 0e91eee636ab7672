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

__all__ = ["ts_available", "run_totalsegmentator", "load_precomputed", "check_labels", "NO_WEIGHTS_HINT"]

NO_WEIGHTS_HINT = ("TotalSegmentator weights are not installed locally (checked TOTALSEG_WEIGHTS_PATH, "
                   "TOTALSEG_HOME_DIR and ~/.totalsegmentator; download them once with "
                   "`totalseg_download_weights -t total` on a machine with internet)")


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


def _load_label_file(path: Path, preloaded=None):
    from .load import load_nifti

    v = preloaded if preloaded is not None else load_nifti(path, want_hash=False)
    a = v.array
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.array_equal(a, np.rint(a)):
            raise CaseError("mask", f"{path.name}: mask holds non-integer values")
    if a.min() < 0 or a.max() > 255:
        raise CaseError("mask", f"{path.name}: mask values must lie in 0..255, found {a.min()}..{a.max()}")
    return a.astype(np.uint8), v.affine


def load_precomputed(mask: str | None, mask_dir: str | None, shape_ras, affine_ras, orientation: str,
                     class_map: str, tol_mm: float, preloaded=None) -> np.ndarray:
    """Read a multilabel NIfTI (TS ids) or a folder of ``<class>.nii.gz`` binary masks onto the image grid."""
    if mask:
        p = Path(mask)
        if not p.exists():
            raise CaseError("mask", f"mask not found: {p.name}")
        a, aff = _load_label_file(p, preloaded)
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
        a, aff = _load_label_file(f)
        m, aff_c, _ = to_canonical(a, aff, orientation)
        _grid_check(f.name, shape_ras, affine_ras, m.shape, aff_c, tol_mm)
        lab[np.asarray(m) > 0] = ids[f.name.split(".nii")[0]]
    return lab
