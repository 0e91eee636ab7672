"""One case, raw files -> :class:`fvlm.data.CaseRecord` (no I/O besides reading the inputs).

Steps: load (nibabel / SimpleITK) -> geometry checks -> HU check/fix -> canonical
orientation -> anatomy label map (TotalSegmentator or precomputed, same reorientation)
-> resample to the target spacing (image linear, labels nearest) -> crops per anatomy
and the centred whole volume -> report text and silver labels.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from fvlm.anatomy import AnatomySet
from fvlm.data.shards import AIR_HU, CaseRecord

from .config import PreprocessConfig
from .crop import center_fit, crop_anatomy, label_boxes
from .errors import CaseError
from .geometry import check_affine, resample, spacing_of, to_canonical
from .hu import apply_hu_policy, to_int16_hu
from .inputs import CaseSpec, hash_id
from .load import load_volume
from .masks import NO_MASK_REASON, load_precomputed, run_totalsegmentator, ts_available, ts_version

__all__ = ["process_case", "crop_shapes", "HU_HIST_EDGES", "affine_from_axcodes"]

log = logging.getLogger("fvlm.preprocess")

#: HU histogram bins stored per case (for summary.json): -1100..1500 in 50 HU steps
HU_HIST_EDGES = np.arange(-1100, 1501, 50)


def crop_shapes(cfg: PreprocessConfig, aset: AnatomySet) -> dict:
    """Effective crop shape per anatomy: the set's, then ``crop.shape_all``, then ``crop.shapes``."""
    out = {}
    for a in aset:
        s = list(a.crop_shape)
        if cfg.crop.shape_all:
            s = list(cfg.crop.shape_all)
        if a.id in cfg.crop.shapes:
            s = list(cfg.crop.shapes[a.id])
        out[a.id] = tuple(int(x) for x in s)
    return out


def affine_from_axcodes(axcodes: str, spacing) -> np.ndarray:
    """A diagonal-orientation affine for voxel axis codes (e.g. ``LPS``) and spacing (mm)."""
    import nibabel as nib

    ornt = nib.orientations.axcodes2ornt(tuple(axcodes.upper()))
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, (ax, flip) in enumerate(ornt):
        aff[int(ax), i] = float(flip) * float(spacing[i])
    return aff


def _hist(arr: np.ndarray) -> list[int]:
    s = arr[::4, ::4, ::4]
    h, _ = np.histogram(s, bins=HU_HIST_EDGES)
    return [int(x) for x in h]


def process_case(spec: CaseSpec, cfg: PreprocessConfig, aset: AnatomySet, labeler=None) -> CaseRecord:
    """Run all steps for one case; raises :class:`CaseError` naming the failing stage."""
    # a multilabel mask file is read + decompressed in a thread while the image loads (zlib
    # releases the GIL); errors surface when its result is used, as a mask-stage error
    mask_future = None
    if spec.mask and cfg.masks.source in ("auto", "precomputed") and Path(spec.mask).is_file():
        from concurrent.futures import ThreadPoolExecutor

        from .load import load_nifti

        pool = ThreadPoolExecutor(1)
        mask_future = pool.submit(load_nifti, spec.mask, False)
        pool.shutdown(wait=False)
    try:
        vol = load_volume(spec.image, spec.series_uid)
    except BaseException:
        if mask_future is not None:
            mask_future.cancel()
        raise
    sha, fmt = vol.sha256, vol.source_format
    affine = vol.affine
    spacing_note = "header"
    if spec.spacing is not None:
        use_meta = cfg.ctrate.spacing_from == "metadata" or (cfg.ctrate.spacing_from == "auto" and vol.blank_header)
        if use_meta:
            if vol.blank_header:
                affine = affine_from_axcodes(cfg.ctrate.blank_header_axcodes, spec.spacing)
                spacing_note = f"metadata (blank header, assumed {cfg.ctrate.blank_header_axcodes.upper()})"
            else:  # keep the header's directions, take the spacing from metadata
                d = affine[:3, :3] / spacing_of(affine)[None, :]
                affine = affine.copy()
                affine[:3, :3] = d * np.asarray(spec.spacing)[None, :]
                spacing_note = "metadata"
    elif vol.blank_header:
        log.warning("%s: NIfTI header has no spatial information; assuming 1 mm voxels as stored", spec.case_id)
        spacing_note = "blank header (1 mm assumed)"
    src_spacing, oblique = check_affine(affine, cfg.max_oblique_deg)
    arr, hu_info = apply_hu_policy(vol.array, cfg.hu.policy, cfg.hu.air_range, cfg.hu.tissue_range,
                                   cfg.hu.subsample, metadata_rescale=spec.rescale)
    del vol
    src_shape = tuple(int(s) for s in arr.shape)
    arr_c, aff_c, src_codes = to_canonical(arr, affine, cfg.orientation)
    sp_c = spacing_of(aff_c)
    hu_hist = _hist(arr_c)

    # ---- anatomy labels on the canonical grid
    src = cfg.masks.source
    has_pre = bool(spec.mask or spec.mask_dir)
    ts_ver = None
    if src == "none":
        ts_lab = None
        mask_source = "none"
    elif src == "totalsegmentator" or (src == "auto" and not has_pre and ts_available()):
        ts_lab = run_totalsegmentator(to_int16_hu(arr_c, cfg.hu.clip), aff_c, cfg.masks.ts_task, cfg.masks.ts_fast,
                                      cfg.masks.ts_device)
        mask_source, ts_ver = "totalsegmentator", ts_version()
    elif has_pre:
        pre = None
        if mask_future is not None:
            try:
                pre = mask_future.result()
            except CaseError as e:
                raise CaseError("mask", e.reason) from None
        ts_lab = load_precomputed(spec.mask, spec.mask_dir, arr_c.shape, aff_c, cfg.orientation,
                                  cfg.masks.class_map, cfg.masks.grid_tolerance_mm, preloaded=pre,
                                  blank_affine=affine)
        mask_source = "precomputed"
    else:
        raise CaseError("mask", NO_MASK_REASON)
    A = len(aset)
    lut = aset.lookup(cfg.masks.class_map)
    if ts_lab is None:
        ts_lab = np.zeros(arr_c.shape, np.uint8)

    # ---- resample to the crop grid (nearest labels commute with the id -> anatomy lookup,
    # so the lookup runs on the smaller resampled grid)
    tsp = tuple(float(x) for x in cfg.target_spacing_mm)
    vol_t = to_int16_hu(resample(arr_c, sp_c, tsp, linear=True), cfg.hu.clip)
    lab_t = lut[resample(ts_lab, sp_c, tsp, linear=False)]
    boxes, counts = label_boxes(lab_t, A)
    shapes = crop_shapes(cfg, aset)
    margin = cfg.crop.margin_mm
    crops, cmasks, present, crop_info = {}, {}, {}, {}
    for k, a in enumerate(aset, start=1):
        ok = int(counts[k]) >= cfg.masks.min_voxels and k in boxes
        present[a.id] = ok
        if not ok:
            continue
        b = boxes[k]
        img, msk, info = crop_anatomy(vol_t, lab_t, k, b, tsp, shapes[a.id],
                                      a.margin_mm if margin is None else margin, cfg.crop.oversize)
        info["truncated"] = bool(min(b[:3]) == 0 or any(b[3 + i] == lab_t.shape[i] for i in range(3)))
        info["voxels"] = int(counts[k])
        crops[a.id], cmasks[a.id], crop_info[a.id] = img, msk, info

    # ---- whole volume
    volume = label_map = None
    bbox: dict = {}
    whole_offset = None
    wsp = tuple(float(x) for x in (cfg.whole.spacing_mm or tsp))
    if cfg.whole.enabled:
        if wsp == tsp:
            vw, lw, wboxes = vol_t, lab_t, boxes
        else:
            vw = to_int16_hu(resample(arr_c, sp_c, wsp, linear=True), cfg.hu.clip)
            lw = lut[resample(ts_lab, sp_c, wsp, linear=False)]
            wboxes, _ = label_boxes(lw, A)
        volume, whole_offset = center_fit(vw, cfg.whole.shape, AIR_HU)
        label_map, _ = center_fit(lw, cfg.whole.shape, 0)
        for k, a in enumerate(aset, start=1):
            if present[a.id] and k in wboxes:
                bbox[a.id] = tuple(int(v + whole_offset[i % 3]) for i, v in enumerate(wboxes[k]))
    else:
        bbox = {a.id: boxes[k] for k, a in enumerate(aset, start=1) if present[a.id]}
    del arr_c, ts_lab

    # ---- report
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

    pid = spec.patient_id or spec.case_id
    if cfg.patient_id == "hash":
        pid = hash_id(pid)
    meta = {
        "source_sha256": sha, "source_format": fmt,
        "source_path_sha256": hashlib.sha256(str(spec.image).encode("utf-8")).hexdigest(),
        "source_shape": list(src_shape), "source_spacing_mm": [round(float(s), 5) for s in src_spacing],
        "source_axcodes": src_codes, "spacing_source": spacing_note, "oblique_deg": round(oblique, 3),
        "hu": hu_info, "hu_hist": hu_hist, "mask_source": mask_source, "ts_class_map": cfg.masks.class_map,
        "ts_version": ts_ver, "crop": crop_info, "resampled_shape": list(vol_t.shape),
        "whole_offset_vox": whole_offset, "whole_spacing_mm": list(wsp), "target_spacing_mm": list(tsp),
        "report_labeler": cfg.reports.taxonomy if labeler is not None else None,
    }
    return CaseRecord(case_id=spec.case_id, patient_id=pid, split=spec.split,
                      spacing_mm=wsp if cfg.whole.enabled else tsp, volume=volume, label_map=label_map,
                      crops=crops, crop_masks=cmasks, present=present, report=report,
                      anatomy_text=anatomy_text, labels=labels, meta=meta, bbox=bbox)
