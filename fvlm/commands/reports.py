"""``fvlm reports``: label radiology reports (``label``) or show how one report is read (``explain``).

    fvlm reports label --in REPORTS.jsonl --out LABELS.jsonl --taxonomy fvlm54|ctrate18|PATH.yaml
    fvlm reports explain --text "FINDINGS: ... IMPRESSION: ..."

Input: JSONL (one object per line with ``id`` and ``findings``/``impressions`` and/or
``text``) or CSV (CT-RATE's layout: ``VolumeName, ClinicalInformation_EN, Technique_EN,
Findings_EN, Impressions_EN``; or columns ``id, findings, impressions, text``). A line that
is not valid JSON or UTF-8, or has no report field, gives an error record
(``{"id": ..., "line": N, "error": "..."}``) in the output, not a crash. Formats:
docs/FORMATS.md, "Taxonomy and report labels".
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from ..cli import resolve_config, shorthand
from ..config import dump_config, opt
from ..errors import CasesFailedError, FvlmError
from ..jsonl import jsonl_lines
from ..taxonomy import NOT_MENTIONED

HELP = "label radiology reports per anatomy and diagnosis (label), or explain one report (explain)"
DEFAULT_CONFIG = "reports/label.yaml"

_CTRATE_COLS = {"id": "VolumeName", "findings": "Findings_EN", "impressions": "Impressions_EN",
                "clinical": "ClinicalInformation_EN", "technique": "Technique_EN"}
_FIELDS = ("findings", "impressions", "text")


@dataclass
class ReportsConfig:
    taxonomy: str = opt("fvlm54", "diagnosis taxonomy: fvlm54, ctrate18 or a YAML path")
    anatomy_set: str | None = opt(None, "anatomies that receive sentences (default: the taxonomy's; "
                                        "ctrate4 sends other anatomies' sentences to the whole-report text)")
    disagreement: Literal["positive_wins", "impression_wins"] = opt(
        "positive_wins", "findings vs impression: 1 > -1 > 0 over both, or the impression's value where it "
                         "mentions the diagnosis")
    uncertain: Literal["keep", "positive", "negative"] = opt(
        "keep", "how uncertain mentions are written: -1, as 1, or as 0")
    label_keys: Literal["name", "id"] = opt("name", "key labels by diagnosis name (CT-RATE column names for "
                                                    "ctrate18) or by id")


SCHEMA = ReportsConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("label", "explain"), help="label a file, or explain one report")
    p.add_argument("--in", dest="inp", metavar="REPORTS", help="label: input .jsonl or .csv")
    p.add_argument("--out", metavar="LABELS.jsonl", help="label: output JSONL (a .config.yaml is written beside it)")
    p.add_argument("--text", help="explain: the report text (free text with optional FINDINGS:/IMPRESSION: headers)")
    p.add_argument("--findings", help="explain: the findings section")
    p.add_argument("--impressions", help="explain: the impression section")
    p.add_argument("--json", action="store_true", help="explain: print JSON instead of a table")
    shorthand(p, "--taxonomy", "taxonomy", "fvlm54, ctrate18 or a taxonomy YAML")
    shorthand(p, "--anatomy-set", "anatomy_set", "anatomy set receiving sentences (e.g. ctrate4)")


def make_labeler(cfg: ReportsConfig):
    from preprocess.reports import ReportLabeler

    return ReportLabeler(cfg.taxonomy, anatomy_set=cfg.anatomy_set, disagreement=cfg.disagreement,
                         uncertain=cfg.uncertain)


# --------------------------------------------------------------------------- input


def _has_bad_bytes(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def read_reports(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(line_no, record, error)``: a record ``{"id", "findings", "impressions", "text"}`` or an error."""
    path = Path(path)
    if not path.is_file():
        raise FvlmError(f"input not found: {path}")
    raw = path.read_bytes()
    if path.suffix.lower() == ".csv":
        yield from _read_csv(raw)
    else:
        yield from _read_jsonl(raw)


def _read_jsonl(raw: bytes):
    for n, obj, why in jsonl_lines(raw):
        if why is not None:
            yield n, None, why
            continue
        if not isinstance(obj, dict):
            yield n, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        yield (n, *_record(obj))


def _record(obj: dict) -> tuple[dict | None, str | None]:
    rid = obj.get("id", obj.get("VolumeName"))
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return {"id": None}, "missing 'id'"
    rec = {"id": rid}
    for k, alt in (("findings", "Findings_EN"), ("impressions", "Impressions_EN"), ("text", "report")):
        v = obj.get(k, obj.get(alt))
        if v is not None and not isinstance(v, str):
            return rec, f"field '{k}' must be a string, got {type(v).__name__}"
        rec[k] = v if v and v.strip() else None
    if not any(rec[k] for k in _FIELDS):
        return rec, "no report text (give 'findings' and/or 'impressions', or 'text')"
    return rec, None


def _read_csv(raw: bytes):
    text = raw.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = set(reader.fieldnames or [])
    ctrate = _CTRATE_COLS["id"] in cols
    if not ctrate and "id" not in cols:
        raise FvlmError(f"CSV has neither CT-RATE's columns ({', '.join(_CTRATE_COLS.values())}) nor 'id' "
                        f"(found: {', '.join(sorted(cols)) or 'none'})")
    for n, row in enumerate(reader, 2):
        if None in row:
            yield n, {"id": row.get(_CTRATE_COLS["id"] if ctrate else "id")}, "more fields than the header"
            continue
        if any(v and _has_bad_bytes(v) for v in row.values()):
            rid = row.get(_CTRATE_COLS["id"] if ctrate else "id")
            yield n, {"id": None if rid is None or _has_bad_bytes(rid) else rid}, "not valid UTF-8"
            continue
        if ctrate:
            obj = {"id": row.get("VolumeName"), "findings": row.get("Findings_EN"),
                   "impressions": row.get("Impressions_EN")}
        else:
            obj = {k: row.get(k) for k in ("id", "findings", "impressions", "text", "report")}
        yield (n, *_record(obj))


# --------------------------------------------------------------------------- actions


def _label(args, cfg: ReportsConfig) -> int:
    from ..progress import progress

    if not args.inp or not args.out:
        raise FvlmError("reports label needs --in REPORTS.jsonl|.csv and --out LABELS.jsonl")
    out = Path(args.out)
    # checked before labelling: these used to surface only after the whole file was labelled
    if not Path(args.inp).is_file():
        raise FvlmError(f"input not found: {args.inp}" + (" (a directory)" if Path(args.inp).is_dir() else ""))
    if out.is_dir():
        raise FvlmError(f"--out {out} is a directory; give the output file, e.g. {out / 'labels.jsonl'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise FvlmError(f"--out {out}: {out.parent} is a file, not a directory")
    lab = make_labeler(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_ok = n_err = 0
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line_no, rec, err in progress(read_reports(args.inp), desc="reports"):
                if err is not None:
                    n_err += 1
                    f.write(json.dumps({"id": (rec or {}).get("id"), "line": line_no, "error": err},
                                       ensure_ascii=False) + "\n")
                    continue
                res = lab.label(findings=rec["findings"], impressions=rec["impressions"], text=rec["text"])
                f.write(json.dumps({"id": rec["id"], **res.to_json(keys=cfg.label_keys)}, ensure_ascii=False)
                        + "\n")
                n_ok += 1
        tmp.replace(out)
    except BaseException:  # no stray .tmp beside a failed or interrupted run; an older output stays as it was
        tmp.unlink(missing_ok=True)
        raise
    dump_config(cfg, out.with_name(out.name + ".config.yaml"))
    print(f"labelled {n_ok} reports, {n_err} error records -> {out}", file=sys.stderr)
    if n_err and not n_ok:
        raise CasesFailedError(f"no report could be labelled: all {n_err} lines are error records (see {out})")
    return 0


def format_explanation(exp: dict) -> str:
    lines = [f"taxonomy: {exp['taxonomy']}"]
    for i, c in enumerate(exp["clauses"], 1):
        anat = ", ".join(f"{a}={s}" for a, s in c["status"].items()) or "(whole report)"
        lines.append(f"[{i}] {c['section']}: {c['clause']}")
        lines.append(f"     anatomies: {anat}")
        for m in c["labels"]:
            why = f"cue '{m['cue']}'" if m["cue"] else "affirmed"
            lines.append(f"     {m['name']} = {m['value']:>2}  ({m['kind']} '{m['phrase']}', {why})")
    names = exp.get("names", {})
    lines.append("labels (non-zero): " + (", ".join(f"{names.get(k, k)}={v}" for k, v in exp["labels"].items())
                                          or "none"))
    return "\n".join(lines)


def _explain(args, cfg: ReportsConfig) -> int:
    if not (args.text or args.findings or args.impressions):
        raise FvlmError("reports explain needs --text (or --findings/--impressions)")
    lab = make_labeler(cfg)
    res = lab.label(findings=args.findings, impressions=args.impressions, text=args.text)
    exp = res.explain()
    exp["anatomies"] = {a: t.status for a, t in res.anatomies.items()}
    exp["names"] = {d.id: d.name for d in lab.taxonomy.diagnoses}
    if args.json:
        print(json.dumps(exp, ensure_ascii=False, indent=2))
    else:
        print(format_explanation(exp))
        print("anatomies: " + ", ".join(f"{a}={s}" for a, s in exp["anatomies"].items() if s != NOT_MENTIONED))
    return 0


def run(args) -> int:
    cfg = resolve_config(args, SCHEMA, DEFAULT_CONFIG)
    if args.action == "label":
        return _label(args, cfg)
    return _explain(args, cfg)
