"""Score the labeler on annotated reports: per-label precision/recall, anatomy and status accuracy.

Fixture files (``fvlm-report-fixtures`` v1, see tests/fixtures/reports/) hold sentences or
whole reports with the expected non-zero labels, anatomies and statuses. A label counts as
positive when it is 1; uncertain (-1) is scored separately as exact agreement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fvlm.errors import check_format
from fvlm.taxonomy import NOT_MENTIONED

__all__ = ["LabelScore", "FixtureScore", "load_fixtures", "score_fixtures", "format_table"]


@dataclass
class LabelScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


@dataclass
class FixtureScore:
    labels: dict[str, LabelScore] = field(default_factory=dict)
    items: int = 0
    exact_labels: int = 0           # items whose whole label vector matches
    anatomy_items: int = 0
    exact_anatomies: int = 0        # sentences whose anatomy set matches
    status_total: int = 0
    status_correct: int = 0         # per (report, anatomy) status matches
    uncertain_total: int = 0
    uncertain_correct: int = 0
    failures: list[str] = field(default_factory=list)

    def micro(self) -> LabelScore:
        s = LabelScore()
        for v in self.labels.values():
            s.tp += v.tp
            s.fp += v.fp
            s.fn += v.fn
        return s


def load_fixtures(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return check_format(data, "fvlm-report-fixtures", 1, path)


def _score_labels(score: FixtureScore, item_id: str, expected: dict, got: dict, keys: list[str]) -> None:
    score.items += 1
    ok = True
    for k in keys:
        e, g = int(expected.get(k, 0)), int(got.get(k, 0))
        ls = score.labels.setdefault(k, LabelScore())
        if e == 1 and g == 1:
            ls.tp += 1
        elif g == 1:
            ls.fp += 1
        elif e == 1:
            ls.fn += 1
        if e == -1 or g == -1:
            score.uncertain_total += 1
            score.uncertain_correct += int(e == g)
        if e != g:
            ok = False
            score.failures.append(f"{item_id}: {k} expected {e} got {g}")
    score.exact_labels += int(ok)


def score_fixtures(labelers, sentences: dict | None = None, reports: dict | None = None) -> FixtureScore:
    """Score fixture sentences and/or reports. ``labelers``: a callable name -> ReportLabeler."""
    score = FixtureScore()
    if sentences:
        lab = labelers(sentences.get("taxonomy", "fvlm54"))
        keys = [d.id for d in lab.taxonomy.diagnoses]
        for i, s in enumerate(sentences["sentences"]):
            res = lab.label(findings=s["text"])
            _score_labels(score, f"sentence {i + 1}", s.get("labels") or {}, res.labels, keys)
            got = sorted({a for c in res.clauses for a in c.anatomies})
            score.anatomy_items += 1
            if got == sorted(s.get("anatomies") or []):
                score.exact_anatomies += 1
            else:
                score.failures.append(f"sentence {i + 1}: anatomies expected {sorted(s.get('anatomies') or [])} got {got}")
    if reports:
        for r in reports["reports"]:
            lab = labelers(r.get("taxonomy", "fvlm54"))
            res = lab.label(findings=r.get("findings"), impressions=r.get("impressions"), text=r.get("text"))
            # expected labels may name a diagnosis by id, name or CT-RATE column; scored by id
            expected = {lab.taxonomy.diagnosis(k).id: v for k, v in (r.get("labels") or {}).items()}
            _score_labels(score, r["id"], expected, res.labels, list(res.labels))
            want = r.get("status") or {}
            for a, t in res.anatomies.items():
                e = want.get(a, NOT_MENTIONED)
                score.status_total += 1
                if t.status == e:
                    score.status_correct += 1
                else:
                    score.failures.append(f"{r['id']}: {a} status expected {e} got {t.status}")
    return score


def format_table(score: FixtureScore, only_present: bool = True) -> str:
    """A Markdown table of per-label precision/recall (labels with any positive expected or predicted)."""
    def f(x):
        return "  -  " if x != x else f"{x:.2f}"
    rows = ["| label | TP | FP | FN | precision | recall |", "|---|---:|---:|---:|---:|---:|"]
    for k, s in sorted(score.labels.items()):
        if only_present and not (s.tp or s.fp or s.fn):
            continue
        rows.append(f"| {k} | {s.tp} | {s.fp} | {s.fn} | {f(s.precision)} | {f(s.recall)} |")
    m = score.micro()
    rows.append(f"| **micro** | {m.tp} | {m.fp} | {m.fn} | {f(m.precision)} | {f(m.recall)} |")
    return "\n".join(rows)
