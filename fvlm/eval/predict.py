"""Zero-shot scores for one scan, preprocessed in memory (``fvlm predict``).

The scan goes through the same steps as ``fvlm preprocess`` (``preprocess.case.process_case``)
without writing shards, then through the checkpoint's input transform, one image
forward, and the same prompt scoring as the suite. Thresholded calls are made only
with thresholds tuned by ``fvlm zeroshot`` for *this* checkpoint (its ``results.json``,
or ``meta["thresholds"]`` in the checkpoint); the scoring settings then come from the
same source, so scores and thresholds live on the same scale.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FvlmError
from .prompts import GLOBAL, build_prompt_sets, encode_prompt_sets, model_logit_scale, score

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


def scoring_from_results(doc: dict, checkpoint_sha256: str | None) -> Scoring:
    """Thresholds and scoring settings of a ``results.json`` made for this checkpoint."""
    ck = (doc.get("checkpoint") or {}).get("sha256")
    if checkpoint_sha256 and ck and ck != checkpoint_sha256:
        raise FvlmError("the thresholds file was computed for another checkpoint "
                        f"(sha256 {ck[:12]}..., this one {checkpoint_sha256[:12]}...); its thresholds do not apply")
    sc = doc.get("scoring") or {}
    thr = {d: v["threshold"] for d, v in (doc.get("zeroshot") or {}).get("diagnoses", {}).items()
           if v.get("threshold") is not None}
    return Scoring(sc.get("rule", "pairwise"), sc.get("prompts", "taxonomy"), sc.get("logit_scale"),
                   str(sc.get("embedding", "")).startswith("global"), thr, "results.json")


def scoring_from_meta(meta: dict) -> Scoring | None:
    t = meta.get("thresholds")
    if not t:
        return None
    if isinstance(t, dict) and "values" in t:  # {"values": {...}, "scoring": {...}}
        sc = t.get("scoring") or {}
        return Scoring(sc.get("rule", "pairwise"), sc.get("prompts", "taxonomy"), sc.get("logit_scale"),
                       bool(sc.get("clip_baseline", False)), {k: float(v) for k, v in t["values"].items()},
                       "checkpoint")
    return Scoring(thresholds={k: float(v) for k, v in t.items()}, source="checkpoint")


def predict_record(model, make_batch, record, taxonomy, scoring: Scoring) -> list[dict]:
    """Per-diagnosis scores (and calls where a threshold exists) for one ``CaseRecord``."""
    out = model.encode_image(make_batch([record]))
    emb = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32))
           for k, v in out.items()}
    clip = scoring.clip_baseline or set(emb) == {GLOBAL}
    sets = [ps for ps in build_prompt_sets(taxonomy, scoring.prompts, clip) if ps.embedding in emb]
    pe = encode_prompt_sets(model, sets)
    scale = scoring.logit_scale if scoring.logit_scale is not None else model_logit_scale(model)
    present = dict(getattr(record, "present", {}) or {})
    rows = []
    for ps in sets:
        s = float(score(emb[ps.embedding], pe.positives[ps.diagnosis], pe.negatives[ps.diagnosis],
                        scoring.rule, scale)[0])
        thr = scoring.thresholds.get(ps.diagnosis)
        row = {"id": ps.diagnosis, "name": ps.name, "anatomy": ps.anatomy, "score": round(s, 6),
               "threshold": thr, "call": None if thr is None else ("positive" if s >= thr else "negative"),
               "anatomy_present": True if ps.anatomy == GLOBAL else bool(present.get(ps.anatomy, True))}
        if not row["anatomy_present"]:
            row["call"] = None  # the organ is not in the scan: no statement about it
        rows.append(row)
    return rows


def preprocess_in_memory(image: str, mask: str | None, mask_dir: str | None, pcfg, case_id: str | None = None):
    """``preprocess.case.process_case`` on one scan; returns the ``CaseRecord`` (nothing written)."""
    from fvlm.anatomy import load_anatomy_set
    from preprocess.case import process_case
    from preprocess.errors import CaseError
    from preprocess.inputs import CaseSpec, sanitize_case_id

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
        rec = process_case(spec, pcfg, aset)
    except CaseError as e:
        raise FvlmError(f"preprocessing {p.name} failed: {e}") from None
    rec.meta = dict(rec.meta or {}, preprocess_seconds=round(time.time() - t0, 3))
    return rec
