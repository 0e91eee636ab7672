"""Measure the labeler on annotated report files kept outside the repository (CT-RATE's reports).

The file is JSON lines, one report per line: ``{"id", "findings", "impressions", "labels"}``
with ``labels`` a mapping from a taxonomy's diagnosis names (or CT-RATE columns) to 0/1.
CT-RATE's report text is CC BY-NC-SA: it is read where it lies (default
``../shared/data/reports/ctrate_dev.jsonl`` next to the checkout, or ``$FVLM_CTRATE_REPORTS``)
and never copied; :func:`find_dev_reports` returns None when it is absent, so callers skip.

The split is fixed once, by patient: a report ``train_44_a`` belongs to patient ``train_44``
and goes to the held-out part when the first 8 hex digits of the patient id's SHA-1, modulo
100, are below ``holdout_percent`` (30). Two scans of one patient never straddle the split,
and the split does not depend on file order or on the labeler. Tune on ``dev``; look only at
scores (never at individual errors) on ``heldout``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fvlm.errors import FormatError
from fvlm.jsonl import read_jsonl

__all__ = ["DevReport", "F1Score", "find_dev_reports", "load_dev_reports", "split_part", "patient_of", "score_reports", "macro_f1",
           "f1_table", "HOLDOUT_PERCENT"]

HOLDOUT_PERCENT = 30
_ROOT = Path(__file__).resolve().parents[2]
_PATIENT = re.compile(r"^(.*?_\d+)(?:_[a-z]+)?$")


@dataclass
class DevReport:
    id: str
    findings: str
    impressions: str
    labels: dict[str, int]


@dataclass
class F1Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)    # (report id, "FP"/"FN")

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def find_dev_reports(path: str | os.PathLike | None = None) -> Path | None:
    """The CT-RATE development reports file, or None when it is not on this machine."""
    cands = [path] if path else [os.environ.get("FVLM_CTRATE_REPORTS"),
                                 _ROOT.parent / "shared" / "data" / "reports" / "ctrate_dev.jsonl"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def patient_of(report_id: str) -> str:
    m = _PATIENT.match(report_id)
    return m.group(1) if m else report_id


def split_part(report_id: str, holdout_percent: int = HOLDOUT_PERCENT) -> str:
    """``"heldout"`` or ``"dev"`` for a report id (fixed, by patient; see module doc)."""
    h = int(hashlib.sha1(patient_of(report_id).encode("utf-8")).hexdigest()[:8], 16)
    return "heldout" if h % 100 < holdout_percent else "dev"


def load_dev_reports(path: str | os.PathLike) -> list[DevReport]:
    out = []
    for n, r in read_jsonl(path, FormatError):
        try:
            out.append(DevReport(str(r["id"]), r.get("findings") or "", r.get("impressions") or "",
                                 {k: int(v) for k, v in r["labels"].items()}))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{path}:{n}: not a report record ({type(e).__name__}: {e})") from None
    return out


def score_reports(labeler, reports: list[DevReport]) -> dict[str, F1Score]:
    """Per-label TP/FP/FN of ``labeler`` (a ReportLabeler) against the reports' labels.

    A predicted label counts as positive when it is 1 (uncertain -1 counts as negative, as
    CT-RATE's labels are binary). Keys are the expected labels' names, in file order.
    """
    tax = labeler.taxonomy
    scores: dict[str, F1Score] = {}
    for r in reports:
        got = labeler.label(findings=r.findings, impressions=r.impressions).labels
        for name, want in r.labels.items():
            s = scores.setdefault(name, F1Score())
            pred = got.get(tax.diagnosis(name).id, 0) == 1
            if want and pred:
                s.tp += 1
            elif pred:
                s.fp += 1
                s.errors.append((r.id, "FP"))
            elif want:
                s.fn += 1
                s.errors.append((r.id, "FN"))
    return scores


def macro_f1(scores: dict[str, F1Score]) -> float:
    vals = [s.f1 for s in scores.values() if s.f1 == s.f1]
    return sum(vals) / len(vals) if vals else float("nan")


def f1_table(columns: dict[str, dict[str, F1Score]]) -> str:
    """A Markdown table: one row per label, per column F1 (and FP/FN), macro-F1 last."""
    names = list(next(iter(columns.values())))
    head = "| label | " + " | ".join(f"{c} F1 | {c} FP/FN" for c in columns) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(columns)]
    for n in names:
        cells = []
        for sc in columns.values():
            s = sc[n]
            cells.append(f"{s.f1:.3f} | {s.fp}/{s.fn}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    rows.append("| **macro-F1** | " + " | ".join(f"**{macro_f1(sc):.3f}** | " for sc in columns.values()) + "|")
    return "\n".join(rows)
