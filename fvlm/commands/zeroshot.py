"""``fvlm zeroshot``: the zero-shot benchmark suite of a pretrained checkpoint."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import resolve_config, shorthand
from ..config import dump_config, merge
from ..errors import FvlmError
from ..eval.config import ZeroShotConfig
from ..logs import setup_logging
from ..resources import config_path
from ..version import __version__

HELP = "evaluate a checkpoint zero-shot: per-diagnosis metrics with patient-bootstrap CIs, probe, retrieval"
DESCRIPTION = (HELP + ". Each case is encoded once (cached), each prompt once; thresholds are tuned on "
               "validation data only. Writes results.json, results.md and figures/ to --out.")
SCHEMA = ZeroShotConfig
DEFAULT_CONFIG = "eval/zeroshot.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    shorthand(p, "--checkpoint", "checkpoint", "consolidated checkpoint to evaluate", metavar="CKPT")
    shorthand(p, "--data", "data", "shard directory written by `fvlm preprocess`", metavar="SHARDS")
    shorthand(p, "--taxonomy", "taxonomy", "fvlm54, ctrate18, ctrate16 or a taxonomy YAML", metavar="NAME|FILE.yaml")
    shorthand(p, "--out", "out", "output directory", metavar="DIR")
    p.add_argument("--labels", action="append", metavar="LABELS.csv|jsonl",
                   help="ground-truth label file (repeatable, e.g. CT-RATE's train and valid CSVs); "
                        "default: the silver labels stored in the shards (config key: labels)")
    p.add_argument("--ctrate", action="store_true",
                   help="CT-RATE protocol: configs/eval/ctrate.yaml (test = 'valid', thresholds from a "
                        "patient-disjoint train subset, ctrate18 taxonomy)")
    p.add_argument("--protocol", choices=("fvlm", "ctclip"), dest="protocol_preset",
                   help="a published CT-RATE protocol: fvlm (configs/eval/ctrate_fvlm.yaml: ctrate16, 4 anatomies) "
                        "or ctclip (configs/eval/ctrate_ctclip.yaml: ctrate18, CT-CLIP prompts); results.md shows "
                        "our number beside the published one")
    p.add_argument("--clip-baseline", action="store_true",
                   help="score every diagnosis on the global embedding (config key: scoring.clip_baseline)")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the thresholds chosen here (on validation data) for `fvlm predict` and "
                        "fvlm.load(...).predict: <checkpoint>.thresholds.json (DIR/thresholds.json for a model "
                        "directory), checked against the checkpoint's SHA-256")


def resolve(args) -> ZeroShotConfig:
    if args.ctrate:
        args.config = [str(config_path("eval/ctrate.yaml"))] + list(args.config or [])
    if getattr(args, "protocol_preset", None):
        args.config = [str(config_path(f"eval/ctrate_{args.protocol_preset}.yaml"))] + list(args.config or [])
    extra: dict = {}
    if args.labels:
        extra["labels"] = list(args.labels)
    if args.clip_baseline:
        extra = merge(extra, {"scoring": {"clip_baseline": True}})
    if extra:
        # dedicated flags are applied last, like shorthands
        args.set = list(args.set or [])
        import json

        def flat(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    yield from flat(v, prefix + k + ".")
                else:
                    yield f"{prefix}{k}={json.dumps(v)}"
        args.set += list(flat(extra))
    cfg = resolve_config(args, SCHEMA, DEFAULT_CONFIG)
    missing = [f"--{k}" for k in ("checkpoint", "data", "out") if not getattr(cfg, k)]
    if missing:
        raise FvlmError(f"missing {', '.join(missing)} (or set them in a --config file)")
    if not (Path(cfg.checkpoint).is_file() or (Path(cfg.checkpoint) / "config.json").is_file()):
        raise FvlmError(f"checkpoint not found: {cfg.checkpoint} (a model.pt written by `fvlm pretrain`, "
                        "or a model directory of `fvlm export`)")
    if not Path(cfg.data).is_dir():
        raise FvlmError(f"shard directory not found: {cfg.data} (written by `fvlm preprocess`)")
    return cfg


def run(args) -> int:
    import time

    from ..eval import embed, labels, loading, predict, report, zeroshot   # torch-backed: loaded when it runs

    cfg = resolve(args)
    out = Path(cfg.out)
    log = setup_logging(out, "zeroshot", quiet=getattr(args, "quiet", False))
    dump_config(cfg, out / "config.yaml")
    tax = loading.load_taxonomy(cfg.taxonomy)
    table = labels.read_label_files(cfg.labels, tax) if cfg.labels else None
    ds = loading.open_shards(cfg.data)
    t0 = time.time()
    ck_hash = loading.checkpoint_sha256(cfg.checkpoint)
    data_hash = embed.data_fingerprint(cfg.data)
    log.info("checkpoint sha256 %s, data hash %s (%.1f s)", ck_hash[:16], data_hash[:16], time.time() - t0)
    model, meta, make_batch = loading.load_model(cfg.checkpoint, cfg.device)
    cache = None
    if cfg.cache.enabled:
        cache = embed.EmbeddingCache(cfg.cache.dir or out / "cache", ck_hash, data_hash)
    provenance = {
        "fvlm_version": __version__,
        "command": " ".join(["fvlm", *sys.argv[1:]]),
        "checkpoint": {"path": str(cfg.checkpoint), "sha256": ck_hash,
                       "meta": {k: meta[k] for k in ("step", "epoch", "model_name", "taxonomy", "anatomy_set", "created",
                                                      "fvlm_version") if k in meta}},
        "data": {"path": str(cfg.data), "hash": data_hash, "hash_method": "fvlm.eval.embed.data_fingerprint",
                 "n_cases": len(ds.case_ids())},
    }
    import torch

    with torch.inference_mode():
        res = zeroshot.run_suite(model, ds, tax, cfg, make_batch, label_table=table, cache=cache, provenance=provenance)
    paths = report.write_outputs(res.results, res.roc, out, figures=cfg.figures)
    zs = res.results["zeroshot"]
    print(f"macro AUC {report.fmt(zs['macro']['overall'].get('auc'))} over {zs['macro']['n_diagnoses']} diagnoses "
          f"({len(zs['skipped'])} skipped); {res.results['protocol']['statement']}")
    print(f"wrote {paths['json']} and {paths['md']}")
    if getattr(args, "write_thresholds", False):
        n_thr = sum(1 for d in zs["diagnoses"].values() if d.get("threshold") is not None)
        tp = predict.write_thresholds(cfg.checkpoint, res.results, source=str(paths["json"]))
        print(f"wrote {tp} ({n_thr} thresholds, from {res.results['protocol'].get('threshold_source')})")
    return 0
