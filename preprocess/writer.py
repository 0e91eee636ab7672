"""One case, raw files -> the :class:`fvlm.data.CaseRecord` a v2 shard stores (no I/O but reading inputs).

Shard layout v2 stores each voxel once: the volume resampled to ``target_spacing_mm`` and
its anatomy label map, plus the per-anatomy mask boxes and crop geometry in ``meta``.
Crops and the volume-mode whole volume are cut when read (``fvlm.data.shards``), so this
path never builds them: load -> geometry checks -> HU -> canonical orientation -> label map
-> one resample (image linear, labels nearest) -> boxes -> report labels.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from fvlm.anatomy import AnatomySet
from fvlm.data.crop import crop_info, crop_positions
from fvlm.data.shards import CaseRecord, ShardLayout, whole_positions

from . import case as _case
from .case import _hist, affine_from_axcodes, crop_shapes
from .config import PreprocessConfig
from .crop import label_boxes
from .errors import CaseError
from .geometry import check_affine, resample, spacing_of, to_canonical
from .hu import apply_hu_policy, to_int16_hu
from .inputs import CaseSpec, hash_id
from .load import load_nifti, load_volume
from .masks import NO_MASK_REASON, load_precomputed

__all__ = ["case_record", "build_layout"]

log = logging.getLogger("fvlm.preprocess")


def build_layout(cfg: PreprocessConfig, aset: AnatomySet) -> ShardLayout:
    """The shard layout (storage and read-time crop / volume geometry) of a config."""
    tsp = tuple(float(x) for x in cfg.target_spacing_mm)
    wsp = tuple(float(x) for x in cfg.whole.spacing_mm) if cfg.whole.spacing_mm else None
    margins = {a.id: float(a.margin_mm if cfg.crop.margin_mm is None else cfg.crop.margin_mm) for a in aset}
    return ShardLayout(anatomies=aset.ids, crop_shapes=crop_shapes(cfg, aset),
                       whole_shape=tuple(cfg.whole.shape) if cfg.whole.enabled else None,
                       compression=cfg.shards.compression, compression_level=cfg.shards.compression_level,
                       shuffle=getattr(cfg.shards, "shuffle", "bit"), spacing_mm=tsp,
                       whole_spacing_mm=None if wsp == tsp else wsp, margins_mm=margins,
                       crop_oversize=cfg.crop.oversize,
                       chunk_shape=tuple(getattr(cfg.shards, "chunk_shape", (64, 64, 32))))


def _mask_future(spec: CaseSpec, cfg: PreprocessConfig):
    # a multilabel mask file is read + decompressed in a thread while the image loads (zlib
    # releases the GIL); errors surface when its result is used, as a mask-stage error
    if not (spec.mask and cfg.masks.source in ("auto", "precomputed") and Path(spec.mask).is_file()):
        return None
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    fut = pool.submit(load_nifti, spec.mask, False)
    pool.shutdown(wait=False)
    return fut


def _affine(spec: CaseSpec, cfg: PreprocessConfig, vol) -> tuple[np.ndarray, str]:
    affine, note = vol.affine, "header"
    if spec.spacing is not None:
        use_meta = cfg.ctrate.spacing_from == "metadata" or (cfg.ctrate.spacing_from == "auto" and vol.blank_header)
        if use_meta:
            if vol.blank_header:
                affine = affine_from_axcodes(cfg.ctrate.blank_header_axcodes, spec.spacing)
                note = f"metadata (blank header, assumed {cfg.ctrate.blank_header_axcodes.upper()})"
            else:  # keep the header's directions, take the spacing from metadata
                d = affine[:3, :3] / spacing_of(affine)[None, :]
                affine = affine.copy()
                affine[:3, :3] = d * np.asarray(spec.spacing)[None, :]
                note = "metadata"
    elif vol.blank_header:
        log.warning("%s: NIfTI header has no spatial information; assuming 1 mm voxels as stored", spec.case_id)
        note = "blank header (1 mm assumed)"
    return affine, note


def _labels(spec: CaseSpec, cfg: PreprocessConfig, arr_c, aff_c, mask_future, src_affine=None):
    """TotalSegmentator ids on the canonical grid (or None), mask source, TS version.
    ``src_affine``: the image's affine in file voxel order (a blank-header mask gets it too)."""
    src = cfg.masks.source
    has_pre = bool(spec.mask or spec.mask_dir)
    if src == "none":
        return None, "none", None
    # TotalSegmentator is looked up through preprocess.case, its one home for both write paths
    if src == "totalsegmentator" or (src == "auto" and not has_pre and _case.ts_available()):
        lab = _case.run_totalsegmentator(to_int16_hu(arr_c, cfg.hu.clip), aff_c, cfg.masks.ts_task, cfg.masks.ts_fast,
                                   cfg.masks.ts_device)
        return lab, "totalsegmentator", _case.ts_version()
    if has_pre:
        pre = None
        if mask_future is not None:
            try:
                pre = mask_future.result()
            except CaseError as e:
                raise CaseError("mask", e.reason) from None
        lab = load_precomputed(spec.mask, spec.mask_dir, arr_c.shape, aff_c, cfg.orientation,
                               cfg.masks.class_map, cfg.masks.grid_tolerance_mm, preloaded=pre,
                               blank_affine=src_affine)
        return lab, "precomputed", None
    raise CaseError("mask", NO_MASK_REASON)


def _report(spec: CaseSpec, cfg: PreprocessConfig, labeler) -> tuple[dict, dict, dict]:
    report = {"findings": spec.findings, "impressions": spec.impressions, "report": spec.report}
    anatomy_text: dict = {}
    labels: dict = {}
    if labeler is not None and any(report.values()):
        try:
            out = labeler.label(findings=spec.findings or None, impressions=spec.impressions or None,
                                text=spec.report or None)
            labels = {str(k): int(v) for k, v in dict(out.labels).items()}
            anatomy_text = {str(k): {"status": str(v.status), "sentences": [str(s) for s in v.sentences]}
                            for k, v in dict(out.anatomies).items()}
        except Exception as e:  # noqa: BLE001 - the labeler is another module; report its failure per case
            if cfg.reports.on_error == "fail":
                raise CaseError("report", f"report labeler failed: {type(e).__name__}: {e}") from None
            log.warning("%s: report labeler failed (%s); storing no labels", spec.case_id, e)
    return report, anatomy_text, labels


def _crop_meta(layout: ShardLayout, boxes: dict, counts, shape, present: dict) -> dict:
    out = {}
    for k, a in enumerate(layout.anatomies, start=1):
        if not present[a]:
            continue
        b = boxes[k]
        pos, scale = crop_positions(b, layout.spacing_mm, layout.crop_shapes[a], layout.margin(a),
                                    layout.crop_oversize)
        info = crop_info(pos, scale, layout.spacing_mm)
        info["truncated"] = bool(min(b[:3]) == 0 or any(b[3 + i] == shape[i] for i in range(3)))
        info["voxels"] = int(counts[k])
        out[a] = info
    return out


def case_record(spec: CaseSpec, cfg: PreprocessConfig, aset: AnatomySet, layout: ShardLayout,
                labeler=None) -> CaseRecord:
    """Run all steps for one case; raises :class:`CaseError` naming the failing stage.

    Returns the v2 record: ``volume`` int16 HU / ``label_map`` uint8 anatomy ids on the
    ``target_spacing_mm`` grid, ``bbox`` on it, crop geometry in ``meta["crop"]``.
    """
    mask_future = _mask_future(spec, cfg)
    try:
        vol = load_volume(spec.image, spec.series_uid)
    except BaseException:
        if mask_future is not None:
            mask_future.cancel()
        raise
    sha, fmt = vol.sha256, vol.source_format
    affine, spacing_note = _affine(spec, cfg, vol)
    src_spacing, oblique = check_affine(affine, cfg.max_oblique_deg)
    arr, hu_info = apply_hu_policy(vol.array, cfg.hu.policy, cfg.hu.air_range, cfg.hu.tissue_range,
                                   cfg.hu.subsample, metadata_rescale=spec.rescale)
    del vol
    src_shape = tuple(int(s) for s in arr.shape)
    arr_c, aff_c, src_codes = to_canonical(arr, affine, cfg.orientation)
    sp_c = spacing_of(aff_c)
    hu_hist = _hist(arr_c)
    ts_lab, mask_source, ts_ver = _labels(spec, cfg, arr_c, aff_c, mask_future, affine)

    # one resample per array (nearest labels commute with the id -> anatomy lookup, so the
    # lookup runs on the smaller resampled grid)
    tsp = layout.spacing_mm
    vol_t = to_int16_hu(resample(arr_c, sp_c, tsp, linear=True), cfg.hu.clip)
    del arr, arr_c
    lut = aset.lookup(cfg.masks.class_map)
    lab_t = (lut[resample(ts_lab, sp_c, tsp, linear=False)] if ts_lab is not None
             else np.zeros(vol_t.shape, np.uint8))
    del ts_lab
    boxes, counts = label_boxes(lab_t, len(aset))
    present = {a: int(counts[k]) >= cfg.masks.min_voxels and k in boxes for k, a in enumerate(aset.ids, start=1)}
    bbox = {a: tuple(int(v) for v in boxes[k]) for k, a in enumerate(aset.ids, start=1) if present[a]}
    whole_offset = None
    if layout.whole_shape:
        _, whole_offset = whole_positions(vol_t.shape, tsp, layout.whole_spacing_mm or tsp, layout.whole_shape)
    report, anatomy_text, labels = _report(spec, cfg, labeler)

    pid = spec.patient_id or spec.case_id
    if cfg.patient_id == "hash":
        pid = hash_id(pid)
    meta = {
        "source_sha256": sha, "source_format": fmt,
        "source_path_sha256": hashlib.sha256(str(spec.image).encode("utf-8")).hexdigest(),
        "source_shape": list(src_shape), "source_spacing_mm": [round(float(s), 5) for s in src_spacing],
        "source_axcodes": src_codes, "spacing_source": spacing_note, "oblique_deg": round(oblique, 3),
        "hu": hu_info, "hu_hist": hu_hist, "mask_source": mask_source, "ts_class_map": cfg.masks.class_map,
        "ts_version": ts_ver, "crop": _crop_meta(layout, boxes, counts, vol_t.shape, present),
        "resampled_shape": list(vol_t.shape), "whole_offset_vox": whole_offset,
        "whole_spacing_mm": list(layout.whole_spacing_mm or tsp), "target_spacing_mm": list(tsp),
        "report_labeler": cfg.reports.taxonomy if labeler is not None else None,
        "source_copy": spec.extra.get("ctrate_version"),      # CT-RATE: v1 original or v2 fixed copy
    }
    return CaseRecord(case_id=spec.case_id, patient_id=pid, split=spec.split, spacing_mm=tsp, volume=vol_t,
                      label_map=lab_t, present=present, report=report, anatomy_text=anatomy_text, labels=labels,
                      meta=meta, bbox=bbox)
