"""Report labeler throughput on one core: sentence splitting and full labeling vs a plain regex splitter.

    python benchmarks/reports_bench.py [--reports 2000] [--taxonomy fvlm54] [--repeat 3]

The corpus is built from the test fixtures (tests/fixtures/reports): each synthetic report
draws CT-RATE-sized findings (14-20 sentences) and an impression (2-4 sentences) from the
fixture sentences and reports, with a fixed seed. Rows, all timed in the same run:

- regex split        : ``re.split`` at ``[.!?]`` + space and newlines (the baseline)
- punkt split        : nltk Punkt (our parameters) on every block
- fvlm sentences     : our splitter (Punkt only where a period is ambiguous)
- fvlm sentences+clauses
- fvlm full labeling : sections, sentences, clauses, anatomies, negation, labels, statuses

Prints a Markdown table (reports/s, us/report, ratio to the regex baseline) and whether the
fast path gave exactly Punkt's sentences on every report.

Two more parts (``--part`` picks one; all three by default):

- ``pathological``: the report "No pleural effusion, " repeated n times (every clause a
  negation cue whose scope runs to the end), labelled at growing n: seconds, microseconds per
  repetition and the time ratio to the smallest n next to the length ratio (linear scaling:
  both ratios grow alike); the per-cue reference scope (``negation.scope_reference``, quadratic)
  timed beside it at small n, and a 1 MB report cut by the labeler's size cap.
- ``ctrate``: per-label F1 of the ctrate18 labeler on CT-RATE's development reports
  (``../shared/data/reports/ctrate_dev.jsonl`` or ``$FVLM_CTRATE_REPORTS``; CC BY-NC-SA, read in
  place, never copied), on the fixed tuning part and the held-out part
  (``preprocess.reports.devset``); skipped with a note when the file is absent. Also checks
  that the linear scope gives the reference scope's labels on those reports and on the fixtures.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preprocess.reports import ReportLabeler, SentenceSplitter, regex_split  # noqa: E402
from preprocess.reports import devset  # noqa: E402
from preprocess.reports.negation import scope_reference  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "reports"


def build_corpus(n: int, seed: int = 0) -> list[dict]:
    sents = [s["text"] for s in yaml.safe_load((FIX / "sentences.yaml").read_text())["sentences"]]
    reports = yaml.safe_load((FIX / "reports.yaml").read_text())["reports"]
    pool = list(sents)
    sp = SentenceSplitter()
    for r in reports:
        for k in ("findings", "impressions", "text"):
            if r.get(k):
                pool.extend(s for s in sp.sentences(r[k]) if ":" not in s[:15])
    rng = random.Random(seed)
    out = []
    for i in range(n):
        f = " ".join(rng.choice(pool) for _ in range(rng.randint(14, 20)))
        imp = " ".join(f"{j + 1}. {rng.choice(pool)}" for j in range(rng.randint(2, 4)))
        out.append({"id": f"r{i}", "findings": f, "impressions": imp})
    return out


def _time(fn, corpus, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for r in corpus:
            fn(r)
        best = min(best, time.process_time() - t0)
    return best


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def pathological(sizes=(2000, 4000, 8000, 16000, 32000, 64000), reference_max: int = 4000) -> None:
    """Time vs length for the all-negation report; reference (quadratic) scope at small n."""
    unit = "No pleural effusion, "
    lab = ReportLabeler("fvlm54", max_chars=0)
    ref = ReportLabeler("fvlm54", max_chars=0)
    ref.scope_fn = staticmethod(scope_reference)
    print("\n# pathological report: '" + unit.strip() + "' x n (fvlm54, CPU time best of 3, 1 core)")
    print("| n | characters | linear scope s | us / repetition | x time vs smallest | x length | reference scope s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for n in sizes:
        text = unit * n
        t = _best(lambda: lab.label(findings=text))
        base = base or t
        r = f"{_best(lambda: ref.label(findings=text), 1):.2f}" if n <= reference_max else "-"
        print(f"| {n:,} | {len(text):,} | {t:.3f} | {t / n * 1e6:.1f} | {t / base:.1f} | {n / sizes[0]:.0f} | {r} |")
    big = unit * (1_000_000 // len(unit))
    capped = ReportLabeler("fvlm54")
    t0 = time.process_time()
    capped.label(findings=big)
    print(f"\n1 MB report ({len(big):,} characters) with the default size cap "
          f"({capped.max_chars:,} characters, truncation logged): {time.process_time() - t0:.2f} s")


def ctrate(path=None) -> int:
    """Per-label F1 on CT-RATE's development reports, tuning and held-out parts."""
    found = devset.find_dev_reports(path)
    if found is None:
        print("\n# ctrate: skipped (no ctrate_dev.jsonl at ../shared/data/reports/ or $FVLM_CTRATE_REPORTS)")
        return 0
    reports = devset.load_dev_reports(found)
    parts = {"dev": [r for r in reports if devset.split_part(r.id) == "dev"],
             "held-out": [r for r in reports if devset.split_part(r.id) == "heldout"]}
    lab = ReportLabeler("ctrate18")
    cols = {k: devset.score_reports(lab, v) for k, v in parts.items()}
    print(f"\n# ctrate18 labeler on {found.name}: {len(reports)} reports, split by patient hash "
          f"({len(parts['dev'])} dev for tuning, {len(parts['held-out'])} held out)")
    print(devset.f1_table(cols))
    ref = ReportLabeler("ctrate18")
    ref.scope_fn = staticmethod(scope_reference)
    fx = yaml.safe_load((FIX / "reports.yaml").read_text())["reports"]
    fx += [{"findings": s["text"]} for s in yaml.safe_load((FIX / "sentences.yaml").read_text())["sentences"]]
    same = total = 0
    for name in ("ctrate18", "fvlm54"):
        a, b = ReportLabeler(name), ReportLabeler(name)
        b.scope_fn = staticmethod(scope_reference)
        items = [(r.findings, r.impressions, None) for r in reports] + \
                [(r.get("findings"), r.get("impressions"), r.get("text")) for r in fx]
        for f, i, t in items:
            total += 1
            same += a.label(findings=f, impressions=i, text=t).labels == b.label(findings=f, impressions=i, text=t).labels
    print(f"\nlinear scope == reference scope labels on {same}/{total} reports (CT-RATE dev + fixtures, "
          f"ctrate18 and fvlm54)")
    return 0 if same == total else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=2000)
    ap.add_argument("--taxonomy", default="fvlm54")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", choices=("all", "throughput", "pathological", "ctrate"), default="all")
    ap.add_argument("--ctrate-reports", default=None, help="path of ctrate_dev.jsonl (default: ../shared/data/reports/)")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one core
    rc = 0
    if args.part in ("all", "throughput"):
        throughput(args)
    if args.part in ("all", "pathological"):
        pathological()
    if args.part in ("all", "ctrate"):
        rc = ctrate(args.ctrate_reports)
    return rc


def throughput(args) -> None:
    corpus = build_corpus(args.reports)
    words = sum(len((r["findings"] + " " + r["impressions"]).split()) for r in corpus) / len(corpus)
    sp = SentenceSplitter()
    lab = ReportLabeler(args.taxonomy)

    def regex(r):
        regex_split(r["findings"])
        regex_split(r["impressions"])

    def punkt(r):
        sp.punkt_sentences(r["findings"])
        sp.punkt_sentences(r["impressions"])

    def ours(r):
        sp.sentences(r["findings"])
        sp.sentences(r["impressions"])

    def ours_clauses(r):
        for k in ("findings", "impressions"):
            for s in sp.sentences(r[k]):
                sp.clauses(s)

    def full(r):
        lab.label(findings=r["findings"], impressions=r["impressions"])

    agree = sum(sp.sentences(r[k]) == sp.punkt_sentences(r[k]) for r in corpus for k in ("findings", "impressions"))
    rows = []
    for name, fn in (("regex split (baseline)", regex), ("punkt split", punkt), ("fvlm sentences", ours),
                     ("fvlm sentences+clauses", ours_clauses), ("fvlm full labeling", full)):
        t = _time(fn, corpus, args.repeat)
        rows.append((name, len(corpus) / t, t / len(corpus) * 1e6))
    base = rows[0][1]
    print(f"# reports_bench: {len(corpus)} reports, {words:.0f} words/report, taxonomy {args.taxonomy}, "
          f"1 core (CPU time, best of {args.repeat}), python {platform.python_version()}, {platform.machine()}")
    print("| stage | reports/s | us/report | x regex |")
    print("|---|---:|---:|---:|")
    for name, rps, us in rows:
        print(f"| {name} | {rps:,.0f} | {us:,.0f} | {rps / base:.3f} |")
    full_rps = rows[-1][1]
    print(f"\nfull labeling / regex split ratio: {full_rps / base:.3f}; "
          f"fvlm sentences / punkt ratio: {rows[2][1] / rows[1][1]:.2f}")
    print(f"fast path == Punkt on {agree}/{2 * len(corpus)} sections; target >= 2,000 reports/s for full "
          f"labeling: {'met' if full_rps >= 2000 else 'NOT met'} ({full_rps:,.0f}/s)")


if __name__ == "__main__":
    sys.exit(main())
