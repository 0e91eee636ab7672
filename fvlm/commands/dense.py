"""``fvlm dense train|eval|ground``: dense heads on the shared encoder (CT 3D, X-ray / CT slices 2D)."""
from __future__ import annotations

import argparse

from ..cli import add_common, resolve_config, shorthand
from ..dense.config import DenseConfig

HELP = "dense heads: segmentation, text-driven segmentation and phrase grounding (train | eval | ground)"
DESCRIPTION = (HELP + ". `train` fits a segmentation (model.head=seg) or prompt-conditioned (model.head=text) "
               "head, optionally from a `fvlm pretrain` / `fvlm pretrain-xray` checkpoint; `eval` writes "
               "dense_eval.json + dense_eval.md (per-class Dice/IoU, grounding); `ground` writes heatmaps and "
               "overlays of text prompts on an image.")
SCHEMA = DenseConfig
DEFAULT_CONFIG = "dense/default.yaml"
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
    from ..dense import actions   # the torch-backed program: loaded when the command runs

    cfg = resolve_config(args)
    if args.action == "train":
        return actions.train(cfg, args.out, quiet=args.quiet)
    if args.action == "eval":
        return actions.evaluate(cfg, args.checkpoint, args.out, baselines=not args.no_baselines, quiet=args.quiet)
    return actions.ground(cfg, args.checkpoint, args.image, args.text, args.out)
