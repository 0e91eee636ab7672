"""``fvlm pretrain-xray``: masked image modelling (MAE / GMML) on 2D chest radiographs."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..cli import resolve_config, shorthand
from ..config import dump_config
from ..errors import FvlmError
from ..logs import setup_logging
from ..resources import samples_dir
from ..xray.config import XrayPretrainConfig

HELP = "pretrain a 2D ViT on chest radiographs by masked image modelling (MAE, context-aware MAE, GMML)"
DESCRIPTION = (
    "Masked image modelling on chest X-rays with the shared encoder (spatial_dims=2), trained by the "
    "DeepSpeed engine of `fvlm pretrain` (same train.* keys). MAE hides patches from the encoder (random, "
    "or context-aware with a higher ratio inside the chest contour); GMML corrupts blocks of patches and "
    "reconstructs them. Writes metrics.csv, TensorBoard events, PNG grids, resumable checkpoints and "
    "encoder.pt (fvlm-xray-encoder) to train.out_dir; re-running with the same out_dir resumes "
    "(train.resume: auto). Several processes: `torchrun --nproc_per_node N -m fvlm.cli pretrain-xray ...` "
    "(build an h5 cache first with --build-cache). With --linear-probe, probes frozen features on labelled "
    "images (after training, or alone with --probe-only).")
SCHEMA = XrayPretrainConfig
DEFAULT_CONFIG = "xray/default.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    shorthand(p, "--data", "data.source", "folder or manifest of radiographs ('samples/...' = shipped samples)",
              metavar="PATH")
    shorthand(p, "--out", "train.out_dir", "output folder", metavar="DIR")
    shorthand(p, "--steps", "train.steps", "optimizer steps", type=int, metavar="N")
    shorthand(p, "--linear-probe", "probe.labels", "labels CSV for a linear probe on frozen features",
              metavar="LABELS.csv")
    p.add_argument("--probe-only", action="store_true",
                   help="skip training; probe the encoder given by --encoder (or out_dir/encoder.pt)")
    p.add_argument("--encoder", metavar="ENCODER.pt", default=None,
                   help="encoder checkpoint (fvlm-xray-encoder) for --probe-only")
    p.add_argument("--build-cache", action="store_true",
                   help="only build the h5 cache named by data.cache and exit")


def _resolve_source(src: str) -> str:
    if not src:
        raise FvlmError("no training data: give --data FOLDER_OR_MANIFEST (or data.source in a config)")
    p = Path(src)
    if p.exists():
        return str(p)
    if p.parts and p.parts[0] == "samples" and (samples_dir().parent / p).exists():
        return str(samples_dir().parent / p)
    raise FvlmError(f"data source not found: {src}")


def run(args) -> int:
    from ..xray import data, pretrain, probe   # the torch-backed program: loaded when the command runs

    cfg = resolve_config(args)
    out = Path(cfg.train.out_dir)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    quiet = getattr(args, "quiet", False)
    if out.exists() and not out.is_dir():
        raise FvlmError(f"train.out_dir {out} exists and is not a directory")
    # stderr only until the inputs are checked (and, when training, a resume accepted): a refused
    # run leaves out_dir as it was
    log = setup_logging(None, "pretrain_xray", quiet=quiet or rank != 0, hold=True)
    opened = False

    def open_run_dir():   # once: the cache build and the training both call it
        nonlocal opened
        if opened:
            return
        opened = True
        setup_logging(out if rank == 0 else None, "pretrain_xray", quiet=quiet or rank != 0)
        if rank == 0:
            dump_config(cfg, out / "config.yaml")

    d = cfg.data

    if args.probe_only:
        if not cfg.probe.labels:
            raise FvlmError("--probe-only needs --linear-probe LABELS.csv")
        open_run_dir()
        return _probe(probe, cfg, Path(args.encoder) if args.encoder else out / "encoder.pt", log)

    source = _resolve_source(d.source) if (d.source or not d.cache) else None
    if d.cache and (args.build_cache or not Path(d.cache).is_file()):
        if source is None:
            raise FvlmError(f"cache {d.cache} does not exist; give data.source to build it")
        if world > 1:
            raise FvlmError(f"cache {d.cache} does not exist; build it first in one process with --build-cache")
        open_run_dir()
        summary = data.build_cache(source, d.cache, d.size, d.orientation, d.normalize, d.contour, d.use_window,
                              d.cache_dtype)
        log.info("cache %s: %d images, %d skipped", summary["path"], summary["written"], len(summary["skipped"]))
        if args.build_cache:
            return 0
    elif args.build_cache:
        raise FvlmError("--build-cache needs data.cache (a .h5 path)")

    summary = pretrain.run(cfg, source, on_ready=open_run_dir)
    if summary["interrupted"]:
        return 3
    if cfg.probe.labels and rank == 0:
        return _probe(probe, cfg, out / "encoder.pt", log)
    return 0


def _probe(probe, cfg, encoder_path, log) -> int:
    res = probe.probe_encoder(cfg, encoder_path)
    log.info("linear probe: %s", json.dumps({k: v.get("auc") for k, v in res["labels"].items()}))
    return 0
