"""``fvlm predict``: zero-shot diagnosis scores for one scan, preprocessed in memory."""
from __future__ import annotations

import argparse
import json

from ..errors import FvlmError
from ..version import __version__

HELP = "score one CT scan zero-shot (preprocessing in memory, no shards); calls with tuned thresholds"
DESCRIPTION = (HELP + ". Thresholds: --thresholds RESULTS.json from `fvlm zeroshot` of the same checkpoint, "
               "or the thresholds the checkpoint carries; without either only scores are printed.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="consolidated checkpoint (model.pt) or model directory (`fvlm export`)")
    p.add_argument("--image", required=True, metavar="scan.nii.gz", help="CT volume (NIfTI file or DICOM folder)")
    p.add_argument("--mask", metavar="seg.nii.gz",
                   help="multilabel TotalSegmentator mask (default: run TotalSegmentator if installed)")
    p.add_argument("--mask-dir", metavar="DIR", help="folder of per-class masks <class>.nii.gz")
    p.add_argument("--taxonomy", metavar="NAME|FILE.yaml",
                   help="diagnoses to score (default: the checkpoint's taxonomy, else fvlm54)")
    p.add_argument("--thresholds", metavar="RESULTS.json",
                   help="results.json (or its directory) of `fvlm zeroshot` for this checkpoint (default: the "
                        "checkpoint's thresholds sidecar of `fvlm zeroshot --write-thresholds`, else the "
                        "thresholds it carries)")
    p.add_argument("--preprocess-config", action="append", metavar="FILE.yaml",
                   help="preprocess config (default: the training shards' settings the checkpoint carries, "
                        "meta['preprocess']; else the defaults, with a warning)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--out", metavar="FILE.json", help="also write the predictions as JSON")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import time

    import torch

    from ..eval import loading, predict, report   # torch-backed: loaded when the command runs

    if args.out:  # checked before the model runs; a directory used to fail only at the end (and leave a .tmp)
        from pathlib import Path

        o = Path(args.out)
        if o.is_dir():
            raise FvlmError(f"--out {o} is a directory; give the JSON file to write, e.g. {o / 'predictions.json'}")
        if any(p.exists() and not p.is_dir() for p in o.parents):
            raise FvlmError(f"--out {o}: {next(p for p in o.parents if p.exists() and not p.is_dir())} is a file, "
                            "not a directory")
    t0 = time.time()
    sha = loading.checkpoint_sha256(args.checkpoint)
    model, meta, make_batch = loading.load_model(args.checkpoint, args.device)
    scoring = predict.scoring_for(args.checkpoint, meta, sha, args.thresholds)
    tax_name = loading.taxonomy_name(args.taxonomy, meta)
    tax = loading.load_taxonomy(tax_name)
    pcfg, pcfg_src = predict.resolve_preprocess_config(meta, args.preprocess_config, getattr(model, "names", None),
                                               bool(args.mask or args.mask_dir))
    rec = predict.preprocess_in_memory(args.image, args.mask, args.mask_dir, pcfg)
    with torch.inference_mode():
        rows = predict.predict_record(model, make_batch, rec, tax, scoring)
    if not rows:
        raise FvlmError(f"no diagnosis of taxonomy {tax_name!r} can be scored by this model "
                        "(its anatomies do not match the model's)")
    doc = {"format": predict.PREDICTIONS_FORMAT, "version": predict.PREDICTIONS_VERSION, "fvlm_version": __version__,
           "image": str(args.image), "checkpoint": {"path": str(args.checkpoint), "sha256": sha},
           "taxonomy": str(tax_name), "thresholds_source": scoring.source,
           "scoring": {"rule": scoring.rule, "prompts": scoring.prompts, "logit_scale": scoring.logit_scale,
                       "clip_baseline": scoring.clip_baseline},
           "preprocess_config": pcfg_src, "anatomies_present": dict(rec.present),
           "mask_source": (rec.meta or {}).get("mask_source"),
           "seconds": round(time.time() - t0, 3), "predictions": rows}
    if args.out:
        report.write_json(args.out, doc)
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=1))
        return 0
    w = max(len(r["id"]) for r in rows)
    print(f"{'diagnosis':<{w}}  {'anatomy':<16} {'score':>7}  {'threshold':>9}  call")
    for r in rows:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.4f}"
        call = r["call"] or ("anatomy not in scan" if not r["anatomy_present"] else "-")
        print(f"{r['id']:<{w}}  {r['anatomy']:<16} {r['score']:>7.4f}  {thr:>9}  {call}")
    if scoring.source == "none":
        print("(no thresholds: scores only; pass --thresholds results.json from `fvlm zeroshot` of this checkpoint)")
    if args.out:
        print(f"wrote {args.out}")
    return 0
