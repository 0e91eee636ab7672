"""Zero-shot scores for one scan, preprocessed in memory (``fvlm predict``, ``fvlm.load(...).predict``).

The scan goes through the same steps as ``fvlm preprocess`` (``preprocess.writer.case_record``)
without writing shards, with the preprocessing settings of the shards the model was trained
on (``meta["preprocess"]``, see :func:`preprocess_config_from_meta`), then through the
checkpoint's input transform, one image forward, and the same prompt scoring as the suite.
Thresholded calls are made only with thresholds tuned by ``fvlm zeroshot`` for *this*
checkpoint (its ``results.json``, the ``thresholds.json`` sidecar written by
``fvlm zeroshot --write-thresholds``, or ``meta["thresholds"]`` in the checkpoint); the
scoring settings then come from the same source, so scores and thresholds live on the same scale.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from preprocess.config import PreprocessConfig
from preprocess.errors import CaseError
from preprocess.inputs import CaseSpec, sanitize_case_id
from preprocess.writer import build_layout, case_record

from ..anatomy import load_anatomy_set
from ..config import build, load_config, merge
from ..data.shards import InMemoryCase
from ..errors import FormatError, FvlmError, check_format
from ..logs import get_logger
from ..tempdir import process_temp_dir
from .loading import checkpoint_sha256 as sha_of
from .prompts import GLOBAL, build_prompt_sets, encode_prompt_sets, model_logit_scale, score
from .report import read_results

log = get_logger("eval")

PREDICTIONS_FORMAT = "fvlm-predictions"
PREDICTIONS_VERSION = 1


@dataclass
class Scoring:
    rule: str = "pairwise"
    prompts: str = "taxonomy"
    logit_scale: float | None = None
    clip_baseline: bool = False
    thresholds: dict[str, float] = field(default_factory=dict)
    source: str = "none"          # where thresholds/scoring came from


def check_thresholds(values, where: str) -> dict[str, float]:
    """``{diagnosis id: finite float}``, or a one-line :class:`FvlmError` naming the first bad entry."""
    if not isinstance(values, dict):
        raise FvlmError(f"{where}: thresholds must be a mapping of diagnosis id to a number, "
                        f"got {type(values).__name__}")
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise FvlmError(f"{where}: threshold of {k!r} must be a number, got {type(v).__name__}")
        if not np.isfinite(float(v)):
            raise FvlmError(f"{where}: threshold of {k!r} is {float(v)}, not a finite number")
        out[str(k)] = float(v)
    return out


def _diagnoses(doc: dict, where: str) -> dict:
    zs = doc.get("zeroshot") or {}
    d = zs.get("diagnoses", {}) if isinstance(zs, dict) else None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise FvlmError(f"{where}: zeroshot.diagnoses must map diagnosis ids to {{threshold: ...}}")
    return d


def scoring_from_results(doc: dict, checkpoint_sha256: str | None, where: str = "the thresholds file") -> Scoring:
    """Thresholds and scoring settings of a ``results.json`` made for this checkpoint."""
    ck = (doc.get("checkpoint") or {}).get("sha256") if isinstance(doc.get("checkpoint"), dict) else None
    if checkpoint_sha256 and ck and ck != checkpoint_sha256:
        raise FvlmError(f"{where} was computed for another checkpoint "
                        f"(sha256 {str(ck)[:12]}..., this one {checkpoint_sha256[:12]}...); its thresholds do not apply")
    sc = doc.get("scoring") or {}
    if not isinstance(sc, dict):
        raise FvlmError(f"{where}: 'scoring' must be a mapping")
    thr = check_thresholds({d: v["threshold"] for d, v in _diagnoses(doc, where).items()
                            if v.get("threshold") is not None}, where)
    ls = sc.get("logit_scale")
    if ls is not None and (isinstance(ls, bool) or not isinstance(ls, (int, float)) or not np.isfinite(ls) or ls <= 0):
        raise FvlmError(f"{where}: scoring.logit_scale must be a finite positive number, got {ls!r}")
    return Scoring(sc.get("rule", "pairwise"), sc.get("prompts", "taxonomy"), ls,
                   str(sc.get("embedding", "")).startswith("global"), thr, "results.json")


def scoring_from_meta(meta: dict) -> Scoring | None:
    t = meta.get("thresholds")
    if not t:
        return None
    if isinstance(t, dict) and "values" in t:  # {"values": {...}, "scoring": {...}}
        sc = t.get("scoring") or {}
        return Scoring(sc.get("rule", "pairwise"), sc.get("prompts", "taxonomy"), sc.get("logit_scale"),
                       bool(sc.get("clip_baseline", False)), check_thresholds(t["values"], "the model's thresholds"),
                       "checkpoint")
    return Scoring(thresholds=check_thresholds(t, "the model's thresholds"), source="checkpoint")


@dataclass
class PromptTable:
    """Encoded prompts of one taxonomy under one scoring (reused across scans)."""
    sets: list
    embeddings: object        # fvlm.eval.prompts.PromptEmbeddings
    logit_scale: float


def prompt_table(model, taxonomy, scoring: Scoring, keys) -> PromptTable:
    """Encode the taxonomy's prompts once for image-embedding ``keys`` (``"global"``, anatomies)."""
    keys = set(keys)
    clip = scoring.clip_baseline or keys == {GLOBAL}
    sets = [ps for ps in build_prompt_sets(taxonomy, scoring.prompts, clip) if ps.embedding in keys]
    pe = encode_prompt_sets(model, sets)
    scale = scoring.logit_scale if scoring.logit_scale is not None else model_logit_scale(model)
    return PromptTable(sets, pe, float(scale))


def score_embeddings(emb: dict, present: dict, table: PromptTable, scoring: Scoring) -> list[dict]:
    """Rows of :func:`predict_record` from one scan's embeddings ``{key: (1, E) or (E,)}``."""
    pe = table.embeddings
    rows = []
    for ps in table.sets:
        e = np.asarray(emb[ps.embedding], np.float32).reshape(1, -1)
        s = float(score(e, pe.positives[ps.diagnosis], pe.negatives[ps.diagnosis], scoring.rule,
                        table.logit_scale)[0])
        thr = scoring.thresholds.get(ps.diagnosis)
        row = {"id": ps.diagnosis, "name": ps.name, "anatomy": ps.anatomy, "score": round(s, 6),
               "threshold": thr, "call": None if thr is None else ("positive" if s >= thr else "negative"),
               "anatomy_present": True if ps.anatomy == GLOBAL else bool(present.get(ps.anatomy, True))}
        if not row["anatomy_present"]:
            row["call"] = None  # the organ is not in the scan: no statement about it
        rows.append(row)
    return rows


def predict_record(model, make_batch, record, taxonomy, scoring: Scoring) -> list[dict]:
    """Per-diagnosis scores (and calls where a threshold exists) for one ``CaseRecord``."""
    out = model.encode_image(make_batch([record]))
    emb = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32))
           for k, v in out.items()}
    table = prompt_table(model, taxonomy, scoring, emb)
    return score_embeddings(emb, dict(getattr(record, "present", {}) or {}), table, scoring)


def preprocess_in_memory(image: str, mask: str | None, mask_dir: str | None, pcfg, case_id: str | None = None):
    """One scan through the preprocess write path, read back as from its shard (nothing written):
    the ``CaseRecord`` ``ShardDataset.get`` would give for it."""
    p = Path(image)
    if not p.exists():
        raise FvlmError(f"--image {image}: no such file or folder")
    for m, flag in ((mask, "--mask"), (mask_dir, "--mask-dir")):
        if m and not Path(m).exists():
            raise FvlmError(f"{flag} {m}: not found")
    name = case_id or sanitize_case_id(p.name.split(".nii")[0] if ".nii" in p.name else p.stem)
    spec = CaseSpec(case_id=name, image=str(p), mask=mask, mask_dir=mask_dir)
    aset = load_anatomy_set(pcfg.anatomy_set)
    t0 = time.time()
    try:
        layout = build_layout(pcfg, aset)
        rec = InMemoryCase(case_record(spec, pcfg, aset, layout), layout).get()
    except CaseError as e:
        raise FvlmError(f"preprocessing {p.name} failed: {e}") from None
    rec.meta = dict(rec.meta or {}, preprocess_seconds=round(time.time() - t0, 3))
    return rec


# --------------------------------------------------------------------------- preprocessing settings

#: dataset.json keys (docs/FORMATS.md §2) -> PreprocessConfig keys
_DATASET_KEYS = {"anatomy_set": ("anatomy_set",), "class_map": ("masks", "class_map"),
                 "target_spacing_mm": ("target_spacing_mm",), "whole_spacing_mm": ("whole", "spacing_mm"),
                 "orientation": ("orientation",), "window_default": ("window",),
                 "crop_oversize": ("crop", "oversize")}


def _known(cls, d: dict, prefix: str = "") -> dict:
    """The part of mapping ``d`` that dataclass ``cls`` has keys for (others are logged and dropped)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in d.items():
        if k not in hints:
            log.debug("meta['preprocess']: ignoring unknown key %s%s", prefix, k)
            continue
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            out[k] = _known(hints[k], v, prefix + k + ".")
        else:
            out[k] = v
    return out


def _from_dataset_info(info: dict) -> dict:
    """A ``dataset.json``-style mapping (spacing, layout, anatomy set) -> PreprocessConfig mapping."""
    out: dict = {}
    for src, dst in _DATASET_KEYS.items():
        if info.get(src) is not None:
            cur = out
            for p in dst[:-1]:
                cur = cur.setdefault(p, {})
            cur[dst[-1]] = info[src]
    lay = info.get("layout") or {}
    if lay.get("crop_shapes"):
        out.setdefault("crop", {})["shapes"] = {a: list(s) for a, s in lay["crop_shapes"].items()}
        out["crop"]["shape_all"] = None
    if "whole_shape" in lay:
        if lay["whole_shape"]:
            out.setdefault("whole", {}).update(enabled=True, shape=list(lay["whole_shape"]))
        else:
            out.setdefault("whole", {})["enabled"] = False
    return out


def preprocess_config_from_meta(meta: dict):
    """The preprocessing settings a checkpoint was trained with -> ``PreprocessConfig`` or None.

    ``meta["preprocess"]`` may hold the shard directory's resolved preprocess config
    (``config.yaml``: every ``PreprocessConfig`` key), its ``dataset.json`` fields
    (``target_spacing_mm``, ``whole_spacing_mm``, ``layout.crop_shapes``/``whole_shape``,
    ``anatomy_set``, ``class_map``, ...), or both as ``{"config": {...}, "dataset": {...}}``;
    ``dataset.json`` fields win where both are given (they describe the shards as written).
    """
    emb = meta.get("preprocess")
    if not isinstance(emb, dict) or not emb:
        return None
    if "config" in emb or "dataset" in emb:
        conf, info = emb.get("config") or {}, emb.get("dataset") or {}
    elif "layout" in emb or "window_default" in emb or "whole_spacing_mm" in emb:
        conf, info = {}, emb
    else:
        conf, info = emb, {}
    d = merge(_known(PreprocessConfig, dict(conf)), _from_dataset_info(info))
    try:
        return build(PreprocessConfig, _known(PreprocessConfig, d))
    except Exception as e:  # noqa: BLE001 - a config the checkpoint carries that this fvlm cannot build
        raise FvlmError(f"the checkpoint's preprocessing settings (meta['preprocess']) are not valid: {e}") from None


def resolve_preprocess_config(meta: dict, files=None, model_names=None, have_mask: bool = True):
    """``(PreprocessConfig, source)``: ``files`` (``--preprocess-config``), else the checkpoint's
    ``meta["preprocess"]``, else the defaults with the checkpoint's anatomy set (and a warning:
    the scan is then not preprocessed like the training shards).

    Masks: the settings' precomputed-only mode becomes ``auto`` (a given mask, else
    TotalSegmentator when its weights are found); a global-only model needs none.
    """
    if files:
        pcfg, src = load_config(PreprocessConfig, files=list(files)), "file"
    else:
        pcfg = preprocess_config_from_meta(meta)
        src = "checkpoint"
        if pcfg is None:
            pcfg, src = PreprocessConfig(), "defaults"
            if meta.get("anatomy_set"):
                pcfg.anatomy_set = str(meta["anatomy_set"])  # label-map order must match the model's anatomies
            log.warning("the checkpoint carries no preprocessing settings (meta['preprocess']); using the "
                        "defaults (target spacing %s mm, whole volume %s): results may differ from the suite's "
                        "on the training shards (pass --preprocess-config)",
                        pcfg.target_spacing_mm, pcfg.whole.shape)
    if pcfg.masks.source == "precomputed":
        pcfg.masks.source = "auto"
    if set(model_names or []) == {GLOBAL} and not have_mask:
        pcfg.masks.source = "none"
    return pcfg, src


# --------------------------------------------------------------------------- image inputs


def _is_nibabel(x) -> bool:
    return hasattr(x, "affine") and hasattr(x, "dataobj") and hasattr(x, "header")


def check_affine(aff: np.ndarray, what: str) -> None:
    """A voxel-to-world matrix must be finite with an invertible 3x3 part (else resampling divides by zero)."""
    if not np.isfinite(aff).all():
        raise FvlmError(f"{what}: affine has non-finite values (NaN or inf)")
    det = float(np.linalg.det(aff[:3, :3]))
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise FvlmError(f"{what}: affine is singular (its 3x3 part has determinant {det:g}); voxel sizes must "
                        "be non-zero")


def _as_nifti_file(x, affine, tmpdir: str, name: str, what: str, is_mask: bool = False) -> str | None:
    """A path for ``x``: a path as is; a nibabel image or an ``(X, Y, Z)`` array + 4x4 ``affine``
    written to ``tmpdir`` as NIfTI, so in-memory scans take the file path of ``fvlm preprocess``."""
    import nibabel as nib

    if x is None:
        return None
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if _is_nibabel(x):
        img = x
        check_affine(np.asarray(img.affine, np.float64), what)
    else:
        arr = np.asarray(x)
        if arr.ndim != 3:
            raise FvlmError(f"{what}: expected an (X, Y, Z) array, got shape {tuple(arr.shape)}")
        if affine is None:
            raise FvlmError(f"{what}: an array needs its 4x4 voxel-to-world affine (affine=..., mm, RAS+ world "
                            "as nibabel uses)")
        try:
            aff = np.asarray(affine, np.float64)
        except (TypeError, ValueError):
            raise FvlmError(f"{what}: affine must be a 4x4 array of numbers, got {type(affine).__name__}") from None
        if aff.shape != (4, 4):
            raise FvlmError(f"{what}: affine must be 4x4, got shape {aff.shape}")
        check_affine(aff, what)
        if arr.dtype.kind not in "biuf":
            raise FvlmError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
        if min(arr.shape) < 1:
            raise FvlmError(f"{what}: array of shape {tuple(arr.shape)} has an empty axis")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise FvlmError(f"{what}: array holds {int((~np.isfinite(arr)).sum())} NaN/inf values of "
                            f"{arr.size}")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if is_mask:
            if lo < 0 or hi > 32767 or (arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr))):
                raise FvlmError(f"{what}: a label map holds whole label ids 0..32767, got values in "
                                f"[{lo:g}, {hi:g}]")
            arr = arr.astype(np.uint8 if hi < 256 else np.int16)
        elif arr.dtype.kind == "b" or np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize > 4:
            if lo < -(2 ** 31) or hi >= 2 ** 31:
                raise FvlmError(f"{what}: values in [{lo:g}, {hi:g}] are not CT intensities")
            arr = arr.astype(np.int32)  # NIfTI writers refuse int64 without an explicit header dtype
        elif not np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.float32)
        img = nib.Nifti1Image(arr, aff)
    p = os.path.join(tmpdir, name + ".nii.gz")
    nib.save(img, p)
    return p


def preprocess_scan(image, mask=None, pcfg=None, *, affine=None, mask_dir=None, case_id: str | None = None):
    """One scan from any input -> ``CaseRecord``, by :func:`preprocess_in_memory` (``case_record``).

    ``image``: NIfTI path, DICOM folder, nibabel image, or ``(X, Y, Z)`` HU array with ``affine``;
    ``mask``: a multilabel TotalSegmentator mask as path, nibabel image or array on the image's grid
    (uses the image's ``affine``), or None (TotalSegmentator when its weights are found).
    """
    if isinstance(image, (str, os.PathLike)) and not isinstance(mask, np.ndarray) and not _is_nibabel(mask):
        return preprocess_in_memory(str(image), None if mask is None else str(mask), mask_dir, pcfg, case_id)

    with tempfile.TemporaryDirectory(prefix="scan_", dir=process_temp_dir()) as tmp:
        if _is_nibabel(image) and affine is None:
            affine = image.affine
        if isinstance(image, (str, os.PathLike)) and affine is None and mask is not None \
                and not isinstance(mask, (str, os.PathLike)):
            import nibabel as nib

            if Path(image).is_file():
                affine = nib.load(str(image)).affine
        img_path = _as_nifti_file(image, affine, tmp, "image", "image")
        mask_path = _as_nifti_file(mask, affine, tmp, "mask", "mask", is_mask=True)
        return preprocess_in_memory(img_path, mask_path, mask_dir, pcfg, case_id or "scan")


# --------------------------------------------------------------------------- thresholds sidecar

THRESHOLDS_FORMAT = "fvlm-thresholds"
THRESHOLDS_VERSION = 1


def thresholds_sidecar(checkpoint: str | os.PathLike) -> Path:
    """Where ``fvlm zeroshot --write-thresholds`` stores thresholds: ``<model.pt>.thresholds.json``
    beside a file, ``DIR/thresholds.json`` inside a model directory."""
    p = Path(checkpoint)
    return p / "thresholds.json" if p.is_dir() else p.with_name(p.name + ".thresholds.json")


def thresholds_document(results: dict, source: str | None = None) -> dict:
    """The sidecar document (``fvlm-thresholds`` v1) from a ``results.json`` of ``fvlm zeroshot``."""
    zs = (results.get("zeroshot") or {}).get("diagnoses", {})
    return {"format": THRESHOLDS_FORMAT, "version": THRESHOLDS_VERSION,
            "checkpoint": {"sha256": (results.get("checkpoint") or {}).get("sha256")},
            "scoring": dict(results.get("scoring") or {}),
            "thresholds": {"source": source, "protocol": (results.get("protocol") or {}).get("statement"),
                           "data": (results.get("data") or {}).get("hash")},
            "zeroshot": {"diagnoses": {d: {"threshold": v["threshold"]} for d, v in zs.items()
                                       if v.get("threshold") is not None}}}


def write_thresholds(checkpoint: str | os.PathLike, results: dict, source: str | None = None) -> Path:
    """Write the thresholds of ``results`` (for this checkpoint) to its sidecar, atomically."""
    doc = thresholds_document(results, source)
    if not isinstance(doc["checkpoint"]["sha256"], str) or not doc["checkpoint"]["sha256"]:
        raise FvlmError("these results record no checkpoint sha256; thresholds not tied to a checkpoint are not "
                        "written")
    check_thresholds({d: v["threshold"] for d, v in doc["zeroshot"]["diagnoses"].items()}, "results")
    p = thresholds_sidecar(checkpoint)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def read_thresholds_sidecar(checkpoint: str | os.PathLike, checkpoint_sha256: str | None) -> Scoring | None:
    """Scoring + thresholds of the checkpoint's sidecar, or None when there is none."""
    p = thresholds_sidecar(checkpoint)
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FvlmError(f"{p}: not valid JSON ({e})") from None
    check_format(doc, THRESHOLDS_FORMAT, THRESHOLDS_VERSION, p, what=f"an {THRESHOLDS_FORMAT} file",
                 version_hint="; not applied")
    ck = doc.get("checkpoint")
    ck = ck.get("sha256") if isinstance(ck, dict) else None
    if not isinstance(ck, str) or not ck:
        raise FormatError(f"{p}: records no checkpoint sha256, so it cannot be tied to this checkpoint; not "
                          "applied (re-run `fvlm zeroshot --write-thresholds`, or delete it)")
    if checkpoint_sha256 is None:
        checkpoint_sha256 = sha_of(str(checkpoint))
    sc = scoring_from_results(doc, checkpoint_sha256, str(p))
    sc.source = "thresholds.json"
    return sc


def scoring_for(checkpoint, meta: dict, checkpoint_sha256: str | None, results=None) -> Scoring:
    """Thresholds/scoring: ``results`` (a results.json path or document) > the sidecar >
    ``meta["thresholds"]`` > none (scores only)."""
    if results is not None:
        if not isinstance(results, dict):
            results = read_results(results)
        return scoring_from_results(results, checkpoint_sha256)
    if checkpoint is not None:
        sc = read_thresholds_sidecar(checkpoint, checkpoint_sha256)
        if sc is not None:
            return sc
    return scoring_from_meta(meta) or Scoring()
