"""``fvlm pretrain``: anatomy-level vision-language pretraining (one process; see --help for multi-process)."""
from __future__ import annotations

import argparse

from ..cli import resolve_config, shorthand
from ..ct.config import PretrainConfig

HELP = "anatomy-level vision-language pretraining on preprocessed shards (DeepSpeed)"
DESCRIPTION = (HELP + ". Runs one process (CPU with gloo, or one GPU). For several processes start the same "
               "config with `torchrun --nproc_per_node N -m fvlm.train --config FILE` or "
               "`deepspeed --num_gpus N --module fvlm.train --config FILE`. Re-running with the same out_dir "
               "resumes from its latest checkpoint (train.resume: auto).")
SCHEMA = PretrainConfig
DEFAULT_CONFIG = "train/default.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    shorthand(p, "--out", "out_dir", "output directory", metavar="DIR")
    shorthand(p, ("--data", "--shards"), "data.shards", "directory written by `fvlm preprocess`", metavar="DIR")
    shorthand(p, "--steps", "train.steps", "optimizer steps", metavar="N")
    shorthand(p, "--resume", "train.resume", "auto, never, or a checkpoint directory", metavar="WHAT")


def run(args) -> int:
    from ..ct.pretrain import run as run_pretrain

    cfg = resolve_config(args)
    summary = run_pretrain(cfg)
    return 0 if not summary.get("interrupted") else 3
