"""Cases for dense training and evaluation, and the crops they are trained on.

A :class:`DenseCase` is one volume, windowed to ``[0, 1]`` and indexed ``[x, y, z]``
(RAS+), with an anatomy label map (``0`` background, ``i + 1`` = ``class_names[i]``)
and, where the source has them, finding masks with their text (demo lesions),
image-level labels and report sentences. Sources:

- ``samples``: the shipped TotalSegmentator abdomen CT (``example_ct`` with
  ``example_seg_fast_force_split``, v2 ids) split along z: the held-out axial slices
  ``data.holdout_z`` evaluate, the rest (minus a gap) trains; or, with ``data.holdout=patient``,
  all of it trains and the second shipped patient (``example_ct_dicom``, a contrast CT of the
  upper abdomen, with ``example_seg_dicom``) evaluates;
- ``shards``: :class:`fvlm.data.ShardDataset` cases of a split (the whole volume and its anatomy
  label map; the report labeler's silver labels as phrases, its abnormal anatomy sentences);
- ``demo``: a corpus from :func:`fvlm.demo.generate.generate_corpus` (CT, masks, lesions).

2D encoders (``vit2d_*``) train on axial slices of the same volumes.

Every source makes its volumes through the one sample path (:mod:`fvlm.data.inputs`), like
pretraining, validation and inference: the int16 HU and uint8 labels on the source's grid
(:func:`~fvlm.data.inputs.read_whole` for shards, :func:`~fvlm.data.inputs.grid_regions` for
volumes in memory), resampled to ``data.spacing_mm`` when set, windowed and relabelled by
:func:`~fvlm.data.inputs.build_inputs` (:func:`dense_input`). Training crops
(:func:`sample_crop`), organ crops (:func:`anatomy_crops`) and the sliding windows of evaluation
are cuts of that one volume, with no resize or window of their own.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from preprocess.geometry import spacing_of, to_canonical
from preprocess.load import load_dicom_series

from ..anatomy import load_anatomy_set
from ..data.inputs import read_whole
from ..data.shards import ShardDataset
from ..errors import FormatError, FvlmError
from ..resources import samples_dir
from ..taxonomy import ABNORMAL
from .cases import DenseCase, Finding, dense_input, diagnosis_phrase, hu_int16, volume_case
from .config import DataConfig
from .demo_corpus import read_demo_cases

__all__ = ["Finding", "DenseCase", "class_names_for", "class_prompts", "load_cases", "sample_crop",
           "training_crop", "anatomy_crops", "sample_slices_split", "ClassBalancedCentres", "class_voxel_counts", "dense_input", "hu_int16"]


def class_names_for(cfg: DataConfig) -> list[str]:
    """The anatomy ids segmented, in label order."""
    aset = load_anatomy_set(cfg.anatomy_set)
    if not cfg.classes:
        return list(aset.ids)
    bad = [c for c in cfg.classes if c not in aset]
    if bad:
        raise FvlmError(f"data.classes: {', '.join(bad)} not in anatomy set {cfg.anatomy_set!r} "
                        f"({', '.join(aset.ids)})")
    return list(cfg.classes)


def class_prompts(cfg: DataConfig, class_names: Sequence[str]) -> dict[str, str]:
    """anatomy id -> its readable phrase ("small bowel (incl. duodenum)" -> "small bowel")."""
    aset = load_anatomy_set(cfg.anatomy_set)
    return {c: re.sub(r"\s*\(.*?\)", "", aset[c].name).strip() if c in aset else c.replace("_", " ")
            for c in class_names}


def _dicom_patient(d: Path, lut: np.ndarray, spacing: Sequence[float], cfg: DataConfig, class_names) -> DenseCase:
    """The second shipped patient: ``example_ct_dicom`` (20 axial slices of a contrast CT, 0.98 x 0.98 x
    2 mm) with its TotalSegmentator ``total`` labels, in RAS+, through the sample path at ``data.spacing_mm``
    (default: ``spacing``, the training patient's)."""
    import nibabel as nib

    vol = load_dicom_series(d / "example_ct_dicom", want_hash=False)
    arr, aff, _ = to_canonical(vol.array, vol.affine)
    seg = nib.load(d / "example_seg_dicom.nii.gz")
    ts, seg_aff, _ = to_canonical(np.asarray(seg.dataobj).astype(np.uint8), seg.affine)
    if ts.shape != arr.shape or not np.allclose(seg_aff, aff, atol=0.5):
        raise FvlmError("example_seg_dicom.nii.gz is not on the grid of example_ct_dicom")
    sp = tuple(float(s) for s in spacing_of(aff))
    if not cfg.spacing_mm:       # evaluated on the training patient's grid
        cfg = dataclasses.replace(cfg, spacing_mm=list(spacing))
    case, _ = volume_case("example_ct_dicom", arr, ts.astype(np.uint8), lut, sp, cfg, class_names)
    return case


def _samples(cfg: DataConfig, class_names: Sequence[str]) -> dict[str, list[DenseCase]]:
    import nibabel as nib

    d = samples_dir() / "ct"
    img = nib.as_closest_canonical(nib.load(d / "example_ct.nii.gz"))
    seg = nib.as_closest_canonical(nib.load(d / "example_seg_fast_force_split.nii.gz"))
    hu = hu_int16(np.asarray(img.dataobj, dtype=np.float32))
    ts = np.asarray(seg.dataobj).astype(np.uint8)
    aset = load_anatomy_set(cfg.anatomy_set)
    full = aset.lookup("v2")
    # TotalSegmentator id -> anatomy-set label -> our class index (classes may be a subset / reordered)
    to_ours = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(class_names):
        to_ours[aset.label(c)] = i + 1
    lut = to_ours[full]
    sp = tuple(float(s) for s in img.header.get_zooms()[:3])
    if cfg.holdout == "patient":
        return {"train": [volume_case("example_ct", hu, ts, lut, sp, cfg, class_names)[0]],
                "eval": [_dicom_patient(d, lut, sp, cfg, class_names)]}
    z0, z1 = cfg.holdout_z
    nz = hu.shape[2]
    if not (0 <= z0 < z1 <= nz):
        raise FvlmError(f"data.holdout_z {cfg.holdout_z} must be a range inside 0..{nz}")
    g = cfg.holdout_gap
    out = {"train": [], "eval": []}

    def slab(a, b):
        return volume_case(f"example_ct:z{a}-{b}", hu[:, :, a:b], ts[:, :, a:b], lut, sp, cfg, class_names)[0]

    for name, a, b in (("lower", 0, max(0, z0 - g)), ("upper", min(nz, z1 + g), nz)):
        if b - a > 0:
            out["train"].append(slab(a, b))
    out["eval"].append(slab(z0, z1))
    return out


def _shards(cfg: DataConfig, class_names: Sequence[str], split: str) -> list[DenseCase]:
    if not cfg.root:
        raise FvlmError("data.source=shards needs data.root (the directory written by `fvlm preprocess`)")
    ds = ShardDataset(cfg.root)
    missing = [c for c in class_names if c not in ds.anatomies]
    if missing:
        raise FvlmError(f"{cfg.root}: shards have no anatomy {', '.join(missing)} (they hold {', '.join(ds.anatomies)} "
                        f"of anatomy set {ds.info.get('anatomy_set')!r}); set data.classes or data.anatomy_set")
    if ds.whole_shape is None:
        raise FormatError(f"{cfg.root}: the shards hold no whole volumes (preprocessed with whole.enabled=false); "
                          "dense heads need them: re-run `fvlm preprocess` with whole.enabled=true")
    ids = ds.case_ids(split)
    if not ids:
        raise FvlmError(f"{cfg.root}: no cases in split {split!r}")
    if cfg.max_cases:
        ids = ids[:cfg.max_cases]
    cases = []
    target = list(cfg.spacing_mm) or None
    for cid in ids:
        # the pretraining path's volume-mode input at volume_size = whole_shape (or at data.spacing_mm)
        rec, raw = read_whole(ds, cid, class_names, ds.anatomies, target)
        image, label = dense_input(raw, class_names, cfg.window)
        sentences = [(a, s) for a, t in (rec.anatomy_text or {}).items()
                     if t.get("status") == ABNORMAL for s in t.get("sentences", [])]
        # silver labels are keyed by diagnosis id; cases carry prompt phrases (as the demo source does)
        labels = {diagnosis_phrase(d): v for d, v in (rec.labels or {}).items()}
        sp = tuple(float(s) for s in (target or rec.spacing_mm))
        cases.append(DenseCase(cid, image, label, sp, labels=labels, sentences=sentences))
    return cases


def _demo(cfg: DataConfig, class_names: Sequence[str], split: str) -> list[DenseCase]:
    if not cfg.root:
        raise FvlmError("data.source=demo needs data.root (a corpus written by `fvlm demo`)")
    return read_demo_cases(Path(cfg.root), cfg, class_names, split)


def load_cases(cfg: DataConfig, class_names: Sequence[str], split: str) -> list[DenseCase]:
    """Cases of ``split`` ("train" or "eval") from the configured source."""
    if cfg.source == "samples":
        cases = _samples(cfg, class_names)["train" if split == "train" else "eval"]
    elif cfg.source == "shards":
        cases = _shards(cfg, class_names, cfg.train_split if split == "train" else cfg.eval_split)
    else:
        cases = _demo(cfg, class_names, cfg.train_split if split == "train" else cfg.eval_split)
    return cases


def anatomy_crops(cases: Sequence[DenseCase], class_names: Sequence[str], size: Sequence[int]) -> list[DenseCase]:
    """Per case and finding anatomy: a ``size`` crop centred on that anatomy's mask (bounding-box centre).

    The crop knows where the organ is (from the anatomy mask), not where the lesion is;
    findings whose anatomy is not segmented are skipped. Findings of the same anatomy share a crop.
    """
    out = []
    for c in cases:
        by_anat: dict[str, list[Finding]] = {}
        for f in c.findings:
            if f.mask.any() and f.anatomy in class_names:
                by_anat.setdefault(f.anatomy, []).append(f)
        for anat, fs in by_anat.items():
            organ = c.label == class_names.index(anat) + 1 if c.label is not None else None
            if organ is None or not organ.any():
                continue
            pts = np.argwhere(organ)
            centre = (pts.min(0) + pts.max(0) + 1) // 2
            img = _pad_to(c.image, size)
            origin = [int(np.clip(int(m) - s // 2, 0, img.shape[a] - s)) for a, (m, s) in enumerate(zip(centre, size))]
            sl = tuple(slice(o, o + s) for o, s in zip(origin, size))
            kept = [Finding(f.text, _pad_to(f.mask, size)[sl], f.anatomy, f.diagnosis) for f in fs]
            kept = [f for f in kept if f.mask.any()]
            if kept:
                out.append(DenseCase(f"{c.case_id}:{anat}", img[sl].copy(),
                                     _pad_to(c.label, size)[sl].copy(), c.spacing_mm, c.affine, kept,
                                     dict(c.labels), list(c.sentences)))
    return out


def sample_slices_split(n: int, holdout: tuple[int, int], gap: int) -> tuple[list[int], list[int]]:
    """Train / held-out slice indices for a z-split with a gap (used by tests and baselines)."""
    z0, z1 = holdout
    held = list(range(z0, z1))
    train = [z for z in range(n) if z < z0 - gap or z >= z1 + gap]
    return train, held


def _pad_to(a: np.ndarray, size: Sequence[int], value=0) -> np.ndarray:
    pads = [(0, max(0, s - d)) for d, s in zip(a.shape, size)]
    return np.pad(a, pads, constant_values=value) if any(p[1] for p in pads) else a


def class_voxel_counts(cases: Sequence[DenseCase], n_classes: int) -> np.ndarray:
    """Voxels per label value over the cases' label maps: ``(n_classes + 1,)`` int64, index 0 = background."""
    counts = np.zeros(n_classes + 1, np.int64)
    for c in cases:
        if c.label is not None:
            counts += np.bincount(c.label.ravel(), minlength=n_classes + 1)[:n_classes + 1]
    return counts


class ClassBalancedCentres:
    """Crop centres drawn class by class, so a small organ is trained on as often as a large one.

    Each call picks a class uniformly among the classes with labelled voxels in any case,
    then one of its voxels uniformly (so a case is chosen in proportion to how much of the
    class it holds). With one volume, "large organ" otherwise means "almost every crop":
    uniform foreground voxels put ~70% of the crops on the colon, bowel and bladder.
    """

    def __init__(self, cases: Sequence[DenseCase], n_classes: int):
        self.voxels: dict[int, list[tuple[int, np.ndarray]]] = {}
        for ci, c in enumerate(cases):
            if c.label is None:
                continue
            flat = c.label.ravel()
            order = np.argsort(flat, kind="stable")
            bounds = np.searchsorted(flat[order], np.arange(n_classes + 2))
            for k in range(1, n_classes + 1):
                if bounds[k + 1] > bounds[k]:
                    self.voxels.setdefault(k, []).append((ci, order[bounds[k]:bounds[k + 1]]))
        self.classes = sorted(self.voxels)

    def __call__(self, rng: np.random.Generator, shapes: Sequence[tuple]) -> tuple[int, np.ndarray] | None:
        """``(case index, centre voxel (3,))``, or None when no case has labels. ``shapes``: the cases' shapes."""
        if not self.classes:
            return None
        parts = self.voxels[self.classes[rng.integers(len(self.classes))]]
        sizes = np.array([len(v) for _, v in parts], np.float64)
        ci, flat = parts[rng.choice(len(parts), p=sizes / sizes.sum())]
        return ci, np.array(np.unravel_index(flat[rng.integers(len(flat))], shapes[ci]))


def sample_crop(case: DenseCase, size: Sequence[int], rng: np.random.Generator, fg_prob: float = 0.7,
                masks: Sequence[np.ndarray] = (), jitter: float = 0.25, centre: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray], tuple]:
    """A random crop of ``case`` of ``size`` (3 values: a 3D crop; 2 values: an axial-slice crop).

    With probability ``fg_prob`` the crop is centred on a random foreground voxel (of the
    label map or the extra ``masks``), moved by up to ``jitter`` x the crop size per axis;
    a given ``centre`` (``(3,)`` voxel, e.g. from :class:`ClassBalancedCentres`) is used instead.
    Returns ``(image, label, cropped masks, origin)``.
    """
    if not 0 <= jitter <= 0.5:
        raise FvlmError(f"crop jitter must be in [0, 0.5], got {jitter}")
    vol, lab = case.image, case.label
    fg_src = [m for m in masks if m.any()]
    if lab is not None and lab.any():
        fg_src.append(lab > 0)
    if centre is None and fg_src and rng.random() < fg_prob:
        m = fg_src[rng.integers(len(fg_src))]
        pts = np.argwhere(m)
        centre = pts[rng.integers(len(pts))]
    if len(size) == 2:
        z = int(centre[2]) if centre is not None else int(rng.integers(vol.shape[2]))
        vol = vol[:, :, z]
        lab = lab[:, :, z] if lab is not None else None
        masks = [mk[:, :, z] for mk in masks]
        if centre is not None:
            centre = centre[:2]
    vol = _pad_to(vol, size)
    lab = _pad_to(lab, size) if lab is not None else None
    masks = [_pad_to(mk, size) for mk in masks]
    origin = []
    for ax, s in enumerate(size):
        hi = vol.shape[ax] - s
        if centre is not None:
            j = int(s * jitter)
            o = int(np.clip(int(centre[ax]) - s // 2 + rng.integers(-j, j + 1), 0, hi))
        else:
            o = int(rng.integers(hi + 1))
        origin.append(o)
    sl = tuple(slice(o, o + s) for o, s in zip(origin, size))
    return (vol[sl], lab[sl] if lab is not None else None, [mk[sl] for mk in masks], tuple(origin))


def training_crop(cases: Sequence[DenseCase], size, rng: np.random.Generator, fg_prob: float, jitter: float,
                  balanced: ClassBalancedCentres | None = None) -> dict:
    """One training crop: a random case (or, with ``balanced``, the case of a class-balanced centre)
    -> ``{"image", "label", "has_label", "findings": [(text, cropped mask, diagnosis phrase)], "case"}``."""
    centre = None
    if balanced is not None and rng.random() < fg_prob:
        picked = balanced(rng, [c.image.shape for c in cases])
        if picked is not None:
            case, centre = cases[picked[0]], picked[1]
    if centre is None:
        case = cases[rng.integers(len(cases))]
    masks = [f.mask for f in case.findings]
    img, lab, fm, _ = sample_crop(case, size, rng, fg_prob if balanced is None else 0.0, masks, jitter, centre)
    return {"image": img.astype(np.float32), "label": lab if lab is not None else np.zeros(img.shape, np.uint8),
            "has_label": lab is not None,
            "findings": [(f.text, m, diagnosis_phrase(f.diagnosis)) for f, m in zip(case.findings, fm)], "case": case}
