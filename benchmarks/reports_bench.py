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
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=2000)
    ap.add_argument("--taxonomy", default="fvlm54")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one core
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
