"""``fvlm cache``: store every case of a shards directory already sampled to a model's input grid.

    fvlm cache --config configs/train/vitb3d_gpu.yaml --data shards/      # -> shards/cache/<key>/
    fvlm pretrain --config configs/train/vitb3d_gpu.yaml --data shards/   # reads it (data.cache: auto)

The cache holds, per case, exactly what the device stage would sample from the shards (HU on the
model grid, packed label maps / masks; docs/FORMATS.md §6), uncompressed, so a loader worker only
copies memory. It is keyed by the model's sample options: another input size, anatomy list or
``data.antialias`` builds another cache, and training uses one only when it matches.
"""
from __future__ import annotations

from ..cli import resolve_config, shorthand
from ..errors import FvlmError
from ..logs import setup_logging
from ..ct.config import PretrainConfig

HELP = "sample every case of a shards directory to a model's input grid once (fast training input)"
DESCRIPTION = (HELP + ". Takes the training config (model input size, anatomies); writes <shards>/cache/<key> "
               "(resumable) and prints its bytes per case next to the shards'.")
SCHEMA = PretrainConfig
DEFAULT_CONFIG = "train/default.yaml"


def add_arguments(p) -> None:
    shorthand(p, ("--data", "--shards"), "data.shards", "directory written by `fvlm preprocess`", metavar="DIR")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="write here instead of <shards>/cache/<key>")


def run(args) -> int:
    from pathlib import Path

    from ..ct.pretrain import prepare
    from ..data.cache import build_cache

    cfg = resolve_config(args)
    if not cfg.data.shards:
        raise FvlmError("fvlm cache needs a shards directory (--data DIR)")
    log = setup_logging(None, "cache", quiet=args.quiet)
    source, opts, _, _, _ = prepare(cfg)
    d = build_cache(source, opts, args.cache_dir)
    n = len(source.case_ids())
    cache_b = sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file()) / n
    shard_b = sum(p.stat().st_size for p in Path(source.root, "shards").glob("*.h5")) / n
    log.info("cache %s: %d cases, %.1f MB per case (the v2 shards: %.1f MB per case, compressed)",
             d, n, cache_b / 1e6, shard_b / 1e6)
    return 0
