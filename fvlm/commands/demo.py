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

from ..cli import main, resolve_config, shorthand
from ..config import dump_config, opt
from ..errors import FvlmError
from ..logs import setup_logging

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
    eval_cases: int = opt(0, "also evaluate on a separate, larger generated test split of about this many scans "
                             "(corpus_eval/: same preset and anatomy variants, other patients, plus val scans "
                             "for thresholds); 0 = only the corpus's own test split")
    eval_seed_offset: int = opt(1000, "the evaluation corpus is drawn with seed + this")
    eval_set: list[str] = opt(["probe.enabled=false", "retrieval.enabled=false", "batch_size=8"],
                              "extra key=value overrides of the zero-shot stage on the evaluation split "
                              "(it has no train split, so no probe)")


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
    shorthand(p, "--eval-cases", "eval_cases", "also evaluate on a separate test split of about N scans "
              "(enough positives per focal finding for a narrow CI; ~1 CPU-s per scan)", type=int, metavar="N")


def _stage(name: str, argv: list[str]) -> None:
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


def _diagnosis_table(title: str, res: dict) -> list[str]:
    zs = res["zeroshot"]
    lines = ["", f"{title} ({res['protocol']['statement']})", "",
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
    return lines


def _macro_table(results: dict[str, dict]) -> list[str]:
    lines = ["", "| model | macro AUC [95% CI] | macro balanced acc. | weighted F1 | diagnoses |",
             "|---|---|---|---|---|"]
    for name, res in results.items():
        m = res["zeroshot"]["macro"]["overall"]
        lines.append(f"| {name} | {_auc_line(m)} | {_fmt(m.get('balanced_accuracy', {}).get('value'))} "
                     f"| {_fmt(res['zeroshot'].get('weighted_f1'))} | {m.get('n_diagnoses', '')} |")
    return lines


def summarize(out: Path, agreement: dict, results: dict[str, dict],
              results_eval: dict[str, dict] | None = None) -> str:
    """The demo's summary as Markdown (also printed); ``results_eval``: the same on the evaluation split."""
    lines = ["# fvlm demo results", ""]
    lines += [f"Report labeler vs generator ground truth ({agreement['n_cases']} cases, all splits):", "",
              "| diagnosis | precision | recall | F1 | positives |", "|---|---|---|---|---|"]
    for d, r in sorted(agreement["per_label"].items()):
        lines.append(f"| {d} | {_fmt(r['precision'], 2)} | {_fmt(r['recall'], 2)} | {_fmt(r['f1'], 2)} "
                     f"| {r['tp'] + r['fn']} |")
    if results.get("fvlm"):
        lines += _diagnosis_table("Zero-shot on the test split", results["fvlm"])
    if results:
        lines += _macro_table(results)
    if results_eval:
        if results_eval.get("fvlm"):
            lines += _diagnosis_table("Zero-shot on the evaluation split of corpus_eval/, other patients",
                                      results_eval["fvlm"])
        lines += _macro_table(results_eval)
    lines += ["", f"Outputs under {out}: corpus/ (generated data, ground truth), shards/ (qc/*.png montages, "
              "summary.md), train/<model>/ (checkpoints, metrics.csv, tb/), results/<model>/ (results.json, "
              "results.md, figures/*.png)" + ("; corpus_eval/, shards_eval/, results_eval/<model>/ for the "
                                             "evaluation split" if results_eval else "") + "."]
    return "\n".join(lines) + "\n"


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def eval_corpus_config(cfg: DemoConfig):
    """The generator config of the evaluation corpus: the demo's preset with other patients (seed +
    ``eval_seed_offset``) on the same anatomy variants (``variant_seed``), ids ``eval0001_...``, and
    a val share for thresholds so that about ``eval_cases`` scans are in test."""
    from ..demo.generate import load_preset

    if cfg.eval_cases < 0:
        raise FvlmError(f"eval_cases must be >= 0, got {cfg.eval_cases}")
    g = load_preset(cfg.corpus)
    val = 0.1     # val scans only set thresholds (AUCs do not use them)
    g.splits = {"val": val, "test": 1.0 - val}
    g.n_cases = int(round(cfg.eval_cases / (1.0 - val)))
    g.variant_seed = cfg.seed
    g.seed = cfg.seed + cfg.eval_seed_offset
    g.id_prefix = "eval"
    return g


def _generate(folder: Path, log, **kw) -> None:
    from ..demo.generate import generate_corpus

    if (folder / "manifest.csv").is_file() and (folder / ".complete").is_file():
        return
    print(f"== generate -> {folder}", flush=True)
    info = generate_corpus(folder, **kw)
    (folder / ".complete").write_text(json.dumps({k: v for k, v in info.items() if k != "seconds"}, default=str))
    log.info("generated %s cases (%s patients) in %.1f s into %s", info["n_cases"], info["n_patients"],
             info["seconds"], folder)


def _zeroshot(name: str, ckpt: Path, shards: Path, corpus: Path, rdir: Path, cfg: DemoConfig, extra: list[str],
              q: list[str], sets: list[str]) -> dict:
    zs = ["zeroshot", "--checkpoint", str(ckpt), "--data", str(shards), "--taxonomy", cfg.taxonomy,
          "--labels", str(corpus / "ground_truth" / "labels.csv"), "--out", str(rdir),
          "--config", cfg.zeroshot_config, *_sets(cfg.zeroshot_set), *_sets(sets), *q]
    if "model.mode=global" in extra:
        zs.append("--clip-baseline")
    _stage(f"zeroshot ({name})", zs)
    return json.loads((rdir / "results.json").read_text())


def run(args) -> int:
    if args.quick:
        args.config = ["demo/run_quick.yaml"] + (args.config or [])
    cfg = resolve_config(args)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out, "demo", quiet=getattr(args, "quiet", False))
    dump_config(cfg, out / "config.yaml")
    ev = eval_corpus_config(cfg) if cfg.eval_cases else None
    t0, c0 = time.time(), _cpu_s()
    timings, cpu = {}, {}

    def lap(key: str, t: float, c: float) -> None:
        timings[key], cpu[key] = time.time() - t, _cpu_s() - c

    corpus, corpus_eval = out / "corpus", out / "corpus_eval"
    _generate(corpus, log, n_cases=cfg.n_cases or None, seed=cfg.seed, preset=cfg.corpus)
    if ev is not None:
        _generate(corpus_eval, log, config=ev)
    lap("generate", t0, c0)
    if cfg.generate_only:
        print(f"corpus written to {corpus} (manifest.csv; ground truth in ground_truth/)")
        return 0

    shards, shards_eval = out / "shards", out / "shards_eval"
    t, c = time.time(), _cpu_s()
    q = ["--quiet"] if getattr(args, "quiet", False) else []
    for src, dst in ((corpus, shards), (corpus_eval, shards_eval))[: 2 if ev is not None else 1]:
        _stage("preprocess", ["preprocess", "--manifest", str(src / "manifest.csv"), "--out", str(dst),
                              "--config", cfg.preprocess_config, "--num-workers", str(cfg.num_workers),
                              "--set", f"reports.taxonomy={cfg.taxonomy}", *_sets(cfg.preprocess_set), *q])
    lap("preprocess", t, c)

    runs = {"fvlm": []}
    if cfg.ablation:
        runs.update(cfg.ablation_runs)
    results, results_eval = {}, {}
    for name, extra in runs.items():
        t, c = time.time(), _cpu_s()
        tdir = out / "train" / name
        _stage(f"pretrain ({name})", ["pretrain", "--config", cfg.train_config, "--data", str(shards),
                                      "--out", str(tdir), "--set", f"train.seed={cfg.seed}",
                                      "--set", f"data.taxonomy={cfg.taxonomy}",
                                      *_sets(cfg.train_set), *_sets(extra), *q])
        lap(f"pretrain_{name}", t, c)
        ckpt = tdir / "model.pt"
        if not ckpt.is_file():
            raise FvlmError(f"pretraining wrote no checkpoint at {ckpt}")
        t, c = time.time(), _cpu_s()
        results[name] = _zeroshot(name, ckpt, shards, corpus, out / "results" / name, cfg, extra, q, [])
        lap(f"zeroshot_{name}", t, c)
        if ev is not None:
            t, c = time.time(), _cpu_s()
            results_eval[name] = _zeroshot(f"{name}, evaluation split", ckpt, shards_eval, corpus_eval,
                                           out / "results_eval" / name, cfg, extra, q, cfg.eval_set)
            lap(f"zeroshot_eval_{name}", t, c)

    agreement = labeler_agreement(shards, corpus / "ground_truth" / "labels.csv")
    text = summarize(out, agreement, results, results_eval)
    lap("total", t0, c0)
    text += "\nStage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n"
    text += "Stage CPU seconds (user + sys): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + "\n"
    (out / "summary.md").write_text(text)
    macro = {k: r["zeroshot"]["macro"]["overall"]["auc"] for k, r in results.items()}
    summary = {"labeler": agreement, "timings_s": timings, "cpu_s": cpu, "macro_auc": macro}
    if results_eval:
        summary["macro_auc_eval"] = {k: r["zeroshot"]["macro"]["overall"]["auc"] for k, r in results_eval.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + text)
    return 0
