"""``fvlm demo``: the whole pipeline on a corpus generated from the shipped real CTs.

generate (known ground truth) -> ``fvlm preprocess`` (precomputed masks, reports labeled
while writing shards) -> ``fvlm pretrain`` (tiny encoder, DeepSpeed on CPU) ->
``fvlm zeroshot --labels <ground truth>`` on the test split (thresholds from val) ->
a summary table. Each stage runs through the same entry point a user calls, so the
demo exercises the real code paths; each writes its resolved config and log in its
own folder under ``--out``. Re-running resumes: finished stages are skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..cli import resolve_config, shorthand
from ..config import opt
from ..errors import FvlmError

HELP = "run the whole pipeline on a generated corpus built from the shipped CTs (the quick start)"
DESCRIPTION = HELP + ". " + __doc__.split("\n\n")[1].replace("\n", " ")


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "output directory (corpus/, shards/, train/, results/, summary.md)")
    corpus: str = opt("default", "corpus generator preset (a name under configs/demo/ or a YAML path)")
    n_cases: int = opt(0, "number of generated volumes (0 = the preset's)")
    seed: int = opt(0, "seed of the corpus generator and of training")
    preprocess_config: str = opt("demo/preprocess.yaml", "config of the preprocess stage")
    preprocess_set: list[str] = opt([], "extra key=value overrides for the preprocess stage")
    num_workers: int = opt(1, "preprocess worker processes")
    train_config: str = opt("demo/train.yaml", "config of the pretrain stage")
    train_set: list[str] = opt([], "extra key=value overrides for the pretrain stage")
    zeroshot_config: str = opt("demo/zeroshot.yaml", "config of the zero-shot stage")
    zeroshot_set: list[str] = opt([], "extra key=value overrides for the zero-shot stage")
    taxonomy: str = opt("fvlm54", "taxonomy for report labels and zero-shot prompts")
    ablation: bool = opt(False, "also train the global CLIP baseline and the uncalibrated fVLM loss; compare all three")
    ablation_runs: dict[str, list[str]] = opt(
        {"clip_global": ["model_name=clip", "model.mode=global"],
         "fvlm_uncalibrated": ["loss.calibration=[]"]},
        "ablation variants: name -> overrides of the pretrain stage")
    generate_only: bool = opt(False, "write the corpus and stop")


SCHEMA = DemoConfig
DEFAULT_CONFIG = "demo/run.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    shorthand(p, "--out", "out", "output directory", metavar="DIR")
    p.add_argument("--quick", action="store_true",
                   help="the ~1 minute preset (small corpus, short training; config demo/run_quick.yaml)")
    shorthand(p, "--ablation", "ablation", "also train the CLIP baseline and the uncalibrated loss",
              action="store_const", const=True)
    shorthand(p, "--generate-only", "generate_only", "write the corpus and stop", action="store_const", const=True)
    shorthand(p, "--seed", "seed", "seed of the corpus and training", type=int)
    shorthand(p, "--n-cases", "n_cases", "number of generated volumes", type=int)


def _stage(name: str, argv: list[str]) -> None:
    from ..cli import main

    print(f"\n== {name}: fvlm {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc != 0:
        raise FvlmError(f"the {name} stage failed (exit code {rc}); its log is in the stage's output folder")


def _sets(items: list[str]) -> list[str]:
    out = []
    for s in items:
        out += ["--set", s]
    return out


def labeler_agreement(shards: Path, labels_csv: Path, split: str | None = None) -> dict:
    """Per-diagnosis precision/recall/F1 of the shards' silver labels against the generator's truth.

    Uncertain silver labels (-1) count as positive calls. Only cases whose anatomy is in view
    (the ground truth's ``anatomies_in_view`` column, when present) are counted.
    """
    import csv

    from ..data.shards import ShardDataset

    ds = ShardDataset(shards)
    with open(labels_csv, newline="", encoding="utf-8") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    meta_cols = {"case_id", "patient_id", "split", "region", "anatomies_in_view"}
    diag_cols = [c for c in next(iter(rows.values())).keys() if c not in meta_cols]
    counts = {d: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for d in diag_cols}
    n = 0
    for cid in ds.case_ids(split):
        if cid not in rows:
            continue
        rec = ds.get(cid, volume=False, crops=False)
        n += 1
        for d in diag_cols:
            truth = rows[cid][d] in ("1", "1.0", "True", "true")
            call = rec.labels.get(d, 0) != 0
            key = ("t" if truth == call else "f") + ("p" if call else "n")
            counts[d][key] += 1
    out = {}
    for d, c in counts.items():
        prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else None
        rec_ = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None
        f1 = (2 * prec * rec_ / (prec + rec_)) if prec and rec_ else (0.0 if c["tp"] + c["fn"] else None)
        out[d] = {**c, "precision": prec, "recall": rec_, "f1": f1}
    return {"n_cases": n, "per_label": out}


def _fmt(v, digits=3):
    if isinstance(v, dict):  # a results.json metric entry
        v = v.get("value")
    return "n/a" if v is None else f"{v:.{digits}f}"


def _auc_line(entry: dict) -> str:
    auc = entry.get("auc", {})
    ci = auc.get("ci") or [None, None]
    return f"{_fmt(auc.get('value'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def summarize(out: Path, agreement: dict, results: dict[str, dict]) -> str:
    """The demo's summary as Markdown (also printed)."""
    lines = ["# fvlm demo results", ""]
    lines += [f"Report labeler vs generator ground truth ({agreement['n_cases']} cases, all splits):", "",
              "| diagnosis | precision | recall | F1 | positives |", "|---|---|---|---|---|"]
    for d, r in sorted(agreement["per_label"].items()):
        lines.append(f"| {d} | {_fmt(r['precision'], 2)} | {_fmt(r['recall'], 2)} | {_fmt(r['f1'], 2)} "
                     f"| {r['tp'] + r['fn']} |")
    main = results.get("fvlm")
    if main:
        zs = main["zeroshot"]
        lines += ["", f"Zero-shot on the test split ({main['protocol']['statement']})", "",
                  "| diagnosis | anatomy | AUC [95% CI] | sensitivity | specificity | test pos/neg |",
                  "|---|---|---|---|---|---|"]
        for d, e in zs["diagnoses"].items():
            sup = e["support"]
            lines.append(f"| {d} | {e['anatomy']} | {_auc_line(e)} | {_fmt(e['sensitivity']['value'], 2)} "
                         f"| {_fmt(e['specificity']['value'], 2)} | {sup['positives']}/{sup['negatives']} |")
        folded = {"no column": "the demo generates no finding of this kind, so the ground truth has no column",
                  "produces no": "the model has no embedding for this anatomy (not trained in the demo)"}
        counts = dict.fromkeys(folded, 0)
        for s in zs.get("skipped", []):
            key = next((k for k in folded if k in s["reason"]), None)
            if key:
                counts[key] += 1
            else:
                lines.append(f"| {s['id']} | {s.get('anatomy', '')} | skipped: {s['reason']} | | | |")
        for key, n in counts.items():
            if n:
                lines.append(f"| ({n} diagnoses) | | skipped: {folded[key]} | | | |")
    if results:
        lines += ["", "| model | macro AUC [95% CI] | macro balanced acc. | weighted F1 | diagnoses |",
                  "|---|---|---|---|---|"]
        for name, res in results.items():
            m = res["zeroshot"]["macro"]["overall"]
            lines.append(f"| {name} | {_auc_line(m)} | {_fmt(m.get('balanced_accuracy', {}).get('value'))} "
                         f"| {_fmt(res['zeroshot'].get('weighted_f1'))} | {m.get('n_diagnoses', '')} |")
    lines += ["", f"Outputs under {out}: corpus/ (generated data, ground truth), shards/ (qc/*.png montages, "
              "summary.md), train/<model>/ (checkpoints, metrics.csv, tb/), results/<model>/ (results.json, "
              "results.md, figures/*.png)."]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.quick:
        args.config = ["demo/run_quick.yaml"] + (args.config or [])
    cfg = resolve_config(args)
    from ..config import dump_config
    from ..demo.generate import generate_corpus
    from ..logs import setup_logging

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out, "demo", quiet=getattr(args, "quiet", False))
    dump_config(cfg, out / "config.yaml")
    t0 = time.time()
    timings = {}

    corpus = out / "corpus"
    if not (corpus / "manifest.csv").is_file() or not (corpus / ".complete").is_file():
        print(f"== generate: {cfg.corpus} -> {corpus}", flush=True)
        info = generate_corpus(corpus, n_cases=cfg.n_cases or None, seed=cfg.seed, preset=cfg.corpus)
        (corpus / ".complete").write_text(json.dumps({k: v for k, v in info.items() if k != "seconds"},
                                                     default=str))
        log.info("generated %s cases (%s patients) in %.1f s", info["n_cases"], info["n_patients"],
                 info["seconds"])
    timings["generate"] = time.time() - t0
    if cfg.generate_only:
        print(f"corpus written to {corpus} (manifest.csv; ground truth in ground_truth/)")
        return 0

    shards = out / "shards"
    t = time.time()
    q = ["--quiet"] if getattr(args, "quiet", False) else []
    _stage("preprocess", ["preprocess", "--manifest", str(corpus / "manifest.csv"), "--out", str(shards),
                          "--config", cfg.preprocess_config, "--num-workers", str(cfg.num_workers),
                          "--set", f"reports.taxonomy={cfg.taxonomy}", *_sets(cfg.preprocess_set), *q])
    timings["preprocess"] = time.time() - t

    runs = {"fvlm": []}
    if cfg.ablation:
        runs.update(cfg.ablation_runs)
    results = {}
    for name, extra in runs.items():
        t = time.time()
        tdir = out / "train" / name
        _stage(f"pretrain ({name})", ["pretrain", "--config", cfg.train_config, "--data", str(shards),
                                      "--out", str(tdir), "--set", f"train.seed={cfg.seed}",
                                      "--set", f"data.taxonomy={cfg.taxonomy}",
                                      *_sets(cfg.train_set), *_sets(extra), *q])
        timings[f"pretrain_{name}"] = time.time() - t
        t = time.time()
        rdir = out / "results" / name
        ckpt = tdir / "model.pt"
        if not ckpt.is_file():
            raise FvlmError(f"pretraining wrote no checkpoint at {ckpt}")
        zs = ["zeroshot", "--checkpoint", str(ckpt), "--data", str(shards), "--taxonomy", cfg.taxonomy,
              "--labels", str(corpus / "ground_truth" / "labels.csv"), "--out", str(rdir),
              "--config", cfg.zeroshot_config, *_sets(cfg.zeroshot_set), *q]
        if "model.mode=global" in extra:
            zs.append("--clip-baseline")
        _stage(f"zeroshot ({name})", zs)
        timings[f"zeroshot_{name}"] = time.time() - t
        results[name] = json.loads((rdir / "results.json").read_text())

    agreement = labeler_agreement(shards, corpus / "ground_truth" / "labels.csv")
    text = summarize(out, agreement, results)
    timings["total"] = time.time() - t0
    text += "\nStage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"labeler": agreement, "timings_s": timings,
                                                  "macro_auc": {k: r["zeroshot"]["macro"]["overall"]["auc"]
                                                                for k, r in results.items()}}, indent=2))
    print("\n" + text)
    return 0
