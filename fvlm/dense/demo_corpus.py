"""Read the demo corpus (``fvlm.demo.generate.generate_corpus``) as dense cases.

Per case: ``images/<case>.nii.gz`` (HU), ``masks/<case>.nii.gz`` (TotalSegmentator v2
ids -> our anatomy classes), ``lesions/<case>.nii.gz`` (value k = the k-th finding of the
case in ``ground_truth/findings.jsonl``). A finding's text is the report's positive
findings-section statement naming its diagnosis (else the impression, else the
diagnosis name). Image-level labels: every demo diagnosis is 1 (a finding of it is in
the case) or 0 (it is not; the demo's ground truth is complete). Sentences: the report's
positive statements with their anatomy (every finding, also those without a lesion mask).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..anatomy import load_anatomy_set
from ..errors import FormatError, FvlmError
from .config import DataConfig
from .cases import DenseCase, Finding, diagnosis_phrase, volume_case

__all__ = ["read_demo_cases", "finding_text", "diagnosis_phrase"]


def finding_text(record: dict, statements: Sequence[dict]) -> str:
    f = record["finding"]
    for section in ("findings", "impressions"):
        for s in statements:
            if s.get("positive") and s.get("section") == section and f in s.get("diagnoses", []):
                return s["text"]
    return diagnosis_phrase(f)


def read_demo_cases(root: Path, cfg: DataConfig, class_names: Sequence[str], split: str) -> list[DenseCase]:
    import nibabel as nib

    gt = root / "ground_truth" / "findings.jsonl"
    if not gt.is_file():
        raise FvlmError(f"{root}: not a demo corpus (no ground_truth/findings.jsonl); make one with `fvlm demo`")
    rows = [json.loads(line) for line in gt.read_text(encoding="utf-8").splitlines() if line.strip()]
    all_diag = sorted({r["finding"] for row in rows for r in row.get("findings", [])})
    rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise FvlmError(f"{root}: no demo cases in split {split!r}")
    if cfg.max_cases:
        rows = rows[:cfg.max_cases]
    aset = load_anatomy_set(cfg.anatomy_set)
    to_ours = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(class_names):
        if c in aset:
            to_ours[aset.label(c)] = i + 1
    lut = to_ours[aset.lookup("v2")]
    cases = []
    for row in rows:
        cid = row["case_id"]
        paths = {k: root / k / f"{cid}.nii.gz" for k in ("images", "masks", "lesions")}
        miss = [str(p) for p in paths.values() if not p.is_file()]
        if miss:
            raise FormatError(f"{root}: case {cid} lacks {', '.join(miss)}")
        img = nib.as_closest_canonical(nib.load(str(paths["images"])))
        hu = np.asarray(img.dataobj, dtype=np.float32)
        ts = np.asarray(nib.as_closest_canonical(nib.load(str(paths["masks"]))).dataobj).astype(np.uint8)
        les = np.asarray(nib.as_closest_canonical(nib.load(str(paths["lesions"]))).dataobj).astype(np.uint8)
        stm = row.get("report_statements", [])
        present = {r["finding"] for r in row.get("findings", [])}
        labels = {diagnosis_phrase(d): int(d in present) for d in all_diag}
        said = [(s["anatomy"], s["text"]) for s in stm if s.get("positive") and s.get("anatomy")]
        # the sample path (windowing, data.spacing_mm); the lesion map is sampled with the labels
        case, les = volume_case(cid, hu, ts, lut, tuple(float(s) for s in img.header.get_zooms()[:3]), cfg,
                                 class_names, affine=img.affine, lesions=les, labels=labels, sentences=said)
        case.findings = [Finding(finding_text(r, stm), les == int(r["lesion_id"]), r.get("anatomy", ""), r["finding"])
                         for r in row.get("findings", []) if not cfg.findings or r["finding"] in cfg.findings]
        cases.append(case)
    return cases
