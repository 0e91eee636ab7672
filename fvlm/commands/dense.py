"""``fvlm dense train|eval|ground``: dense heads on the shared encoder (CT 3D, X-ray / CT slices 2D)."""
from __future__ import annotations

import argparse
import os
import logging
from pathlib import Path

from ..cli import add_common, resolve_config, shorthand
from ..dense.config import DenseConfig
from ..errors import FvlmError

HELP = "dense heads: segmentation, text-driven segmentation and phrase grounding (train | eval | ground)"
DESCRIPTION = (HELP + ". `train` fits a segmentation (model.head=seg) or prompt-conditioned (model.head=text) "
               "head, optionally from a `fvlm pretrain` / `fvlm pretrain-xray` checkpoint; `eval` writes "
               "dense_eval.json + dense_eval.md (per-class Dice/IoU, grounding); `ground` writes heatmaps and "
               "overlays of text prompts on an image.")
SCHEMA = DenseConfig
DEFAULT_CONFIG = "dense/default.yaml"
log = logging.getLogger("fvlm.dense")
NO_COMMON = True  # --config/--set/--quiet go on each action so they may follow it


def _data_flags(p):
    shorthand(p, "--data", "data.source", "where images come from", choices=("samples", "shards", "demo"))
    shorthand(p, "--root", "data.root", "shards root or demo corpus directory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a dense head", description="train a dense head (writes dense.pt)")
    t.add_argument("--out", required=True, help="output directory (dense.pt, config.yaml, train.log)")
    shorthand(t, "--encoder", "model.encoder", "encoder name (vit3d_* or vit2d_*)")
    shorthand(t, "--head", "model.head", "seg or text", choices=("seg", "text"))
    shorthand(t, "--pretrained", "model.pretrained", "consolidated checkpoint to start the encoder from")
    shorthand(t, "--freeze-encoder", "model.freeze_encoder", "keep the encoder fixed", action="store_const",
              const=True)
    shorthand(t, "--steps", "train.steps", "optimizer steps", type=int)
    _data_flags(t)
    add_common(t)
    e = sub.add_parser("eval", help="per-class Dice/IoU (and grounding) of a dense checkpoint",
                       description="evaluate a dense checkpoint; writes dense_eval.json and dense_eval.md")
    e.add_argument("--checkpoint", required=True, help="dense.pt written by `fvlm dense train`")
    e.add_argument("--out", help="output directory (default: <checkpoint dir>/eval)")
    e.add_argument("--no-baselines", action="store_true", help="skip the non-learned baselines")
    _data_flags(e)
    add_common(e)
    g = sub.add_parser("ground", help="heatmap + overlay PNG of text prompts on a CT or X-ray",
                       description="phrase grounding with a text-driven dense checkpoint")
    g.add_argument("--checkpoint", required=True, help="dense.pt of a model.head=text model")
    g.add_argument("--image", required=True, help="CT (.nii/.nii.gz) or radiograph (.png/.jpg)")
    g.add_argument("--text", action="append", required=True, help="phrase to ground (repeatable)")
    g.add_argument("--out", help="output directory (default: ./ground_<image name>)")
    add_common(g)


def run(args) -> int:
    from ..logs import setup_logging

    cfg = resolve_config(args)
    if args.action == "train":
        from ..dense.train import train_dense

        out = Path(args.out)
        setup_logging(out, "train", quiet=args.quiet)
        res = train_dense(cfg, out)
        if res["interrupted"]:
            print(f"stopped at step {res['steps']} with a checkpoint; run the same command to resume")
            return 3
        if res["first_loss"] is not None and int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote {res['checkpoint']} (loss {res['first_loss']:.3f} -> {res['final_loss']:.3f}, "
                  f"{res['seconds']:.0f} s)")
        return 0
    if args.action == "eval":
        return _eval(args, cfg)
    return _ground(args, cfg)


def _text_encoder(info: dict, cfg):
    from ..encoders import TextEncoder

    ident = info.get("text_model") or {}
    d = cfg.model.text_model_dir or ident.get("path")
    enc = TextEncoder(d) if d and Path(d).is_dir() else TextEncoder(cfg.model.text_model_dir)
    if ident.get("config_sha256") and enc.identity.get("config_sha256") != ident.get("config_sha256"):
        raise FvlmError(f"the checkpoint was trained with text model {ident.get('name')} "
                        f"(config sha {ident.get('config_sha256')}), found {enc.identity}; "
                        "set model.text_model_dir to the same model")
    return enc


def _inherit_holdout(data, meta: dict):
    """The shipped sample's evaluation data for a checkpoint trained on it: the held-out slices it was
    trained without (its ``holdout_z`` and ``holdout_gap``), or the second patient when either the
    checkpoint or the command asks for it (a model trained on all of example_ct has no held-out slices)."""
    import dataclasses

    if data.source != "samples" or meta.get("data_source") != "samples" or "holdout" not in meta:
        return data
    want = "patient" if "patient" in (meta["holdout"], data.holdout) else "slices"
    trained = {"holdout": want, "holdout_z": list(meta["holdout_z"]), "holdout_gap": int(meta["holdout_gap"])}
    for key, val in trained.items():
        if val != getattr(data, key):
            log.info("data.%s %s -> %s (the checkpoint's held-out data)", key, getattr(data, key), val)
            data = dataclasses.replace(data, **{key: val})
    return data


def _eval(args, cfg) -> int:
    import dataclasses

    from ..config import dump_config
    from ..dense.baselines import baseline_scores
    from ..dense.data import load_cases
    from ..dense.evaluate import eval_cases, evaluate_model, write_eval
    from ..models.dense import load_dense
    from ..logs import setup_logging

    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    setup_logging(None, "eval", quiet=args.quiet, hold=True)
    model, info = load_dense(args.checkpoint)      # checked before anything is written under --out
    setup_logging(out, "eval", quiet=args.quiet)
    meta = info.get("meta", {})
    data = dataclasses.replace(cfg.data, classes=list(model.class_names),
                               anatomy_set=meta.get("anatomy_set", cfg.data.anatomy_set))
    # the model was trained on this window and spacing: evaluate on the same input
    trained = {"window": meta.get("window"), "spacing_mm": meta.get("resample_mm")}
    for key, val in trained.items():
        if val is not None and list(val) != list(getattr(data, key)):
            log.info("data.%s %s -> %s (the checkpoint's training input)", key, list(getattr(data, key)), list(val))
            data = dataclasses.replace(data, **{key: list(val)})
    data = _inherit_holdout(data, meta)
    cfg = dataclasses.replace(cfg, data=data, model=info["model_config"])
    dump_config(cfg, out / "config.yaml")
    volumes = load_cases(data, model.class_names, "eval")
    cases = eval_cases(model, volumes, cfg.eval.crops)
    text = _text_encoder(info, cfg) if model.task == "text" else None
    res = evaluate_model(model, info, cases, cfg.eval, text_encoder=text)
    extra = {}
    if not args.no_baselines and any(c.label is not None for c in cases):
        extra["baselines"] = baseline_scores(load_cases(data, model.class_names, "train"), cases, model.class_names)
    src = {"source": data.source, "root": data.root, "split": "eval" if data.source == "samples" else data.eval_split,
           "n_cases": len(cases), "crops": cfg.eval.crops}
    if cfg.eval.crops == "organ":
        src.update(crop_size=list(model.encoder.img_size), n_volumes=len(volumes))
    if data.source == "samples":
        src["holdout"] = data.holdout
        if data.holdout == "slices":
            src["holdout_z"] = list(data.holdout_z)
    jp, mp = write_eval(res, out, args.checkpoint, src, extra)
    m = res.get("mean") or {}
    msg = f"wrote {jp} and {mp.name}"
    if m.get("dice") is not None:
        msg += f" (mean Dice {m['dice']:.3f}, IoU {m['iou']:.3f})"
    if res.get("grounding"):
        g = res["grounding"]
        msg += (f"; pointing game {g['pointing_game']:.3f} vs chance {g['chance_body']:.3f} "
                f"(p = {g['p_value_vs_chance']:.3g})")
    print(msg)
    return 0


def _ground(args, cfg) -> int:
    from ..config import dump_config
    from ..dense.ground import ground_texts, load_image, save_overlays, write_ground_json
    from ..models.dense import load_dense

    model, info = load_dense(args.checkpoint)
    if model.task != "text":
        raise FvlmError(f"{args.checkpoint} holds a '{model.task}' model; grounding needs model.head=text")
    out = Path(args.out) if args.out else Path(f"ground_{Path(args.image).name.split('.')[0]}")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    image, affine, iinfo = load_image(args.image, model, info.get("meta", {}))
    heat = ground_texts(model, info, image, args.text, _text_encoder(info, cfg), cfg.eval)
    results = [save_overlays(image, h, t, out, affine, iinfo.get("window_hu")) for t, h in zip(args.text, heat)]
    write_ground_json(out, args.image, args.checkpoint, iinfo, results)
    for r in results:
        print(f"{r['text']!r}: peak {r['peak_voxel']} score {r['peak']:.3f} -> {out / r['files']['overlay_png']}")
    return 0
