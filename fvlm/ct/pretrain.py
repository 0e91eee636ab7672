"""The ``fvlm pretrain`` program: config -> data stream, model, loss, DeepSpeed engine -> checkpoints.

Launch (same config everywhere)::

    fvlm pretrain --config my.yaml                              # one process (CPU gloo / one GPU)
    torchrun --nproc_per_node 4 -m fvlm.train --config my.yaml  # N processes
    deepspeed --num_gpus 4 --module fvlm.train --config my.yaml

Multi-node with SLURM (one torchrun per node; it sets RANK/WORLD_SIZE/LOCAL_RANK)::

    #!/bin/bash
    #SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_id "$SLURM_JOB_ID" \
        --rdzv_backend c10d --rdzv_endpoint "$head:29500" \
        -m fvlm.train --config configs/train/vitb3d_gpu.yaml --set data.shards=/data/shards --out runs/vitb

Re-submitting the same command resumes from ``out_dir/checkpoints`` (same number of processes).

Outputs in ``out_dir``: ``config.yaml`` (resolved), ``pretrain.log``, ``metrics.csv``, ``tb/``,
``checkpoints/`` (resumable), ``model.pt`` (consolidated, latest) and ``best.pt`` (best
validation metric).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import yaml

from .. import devices
from ..config import dump_config, load_config
from ..data.cache import open_cache
from ..data.ct import CTDataConfig, CTStream, SampleOptions, prepare_batch
from ..data.shards import ShardDataset
from ..data.synthetic_ct import SyntheticCTSource
from ..engine import loader as engine_loader
from ..engine.distributed import init_distributed
from ..engine.trainer import Trainer
from ..errors import FvlmError
from ..interrupts import interrupts
from ..logs import setup_logging
from ..losses import build_loss
from ..models import create_model
from ..models.checkpoint import save_consolidated
from ..taxonomy import Diagnosis, load_taxonomy
from .config import PretrainConfig, ValConfig
from .validate import check_val_config, quick_validate

__all__ = ["PretrainConfig", "ValConfig", "run", "build_source", "prepare", "main"]

log = logging.getLogger("fvlm.pretrain")


def build_source(cfg: CTDataConfig):
    """The case source: a ShardDataset, or the synthetic generator when ``data.shards`` is null."""
    if cfg.shards:
        if not Path(cfg.shards).is_dir():
            raise FvlmError(f"data.shards: {cfg.shards} is not a directory (run `fvlm preprocess` first)")
        return ShardDataset(cfg.shards)
    try:
        return SyntheticCTSource(**cfg.synthetic)
    except (TypeError, ValueError) as e:
        raise FvlmError(f"data.synthetic: {e}") from None


def _shard_settings(source) -> dict | None:
    """The preprocessing settings of the shard directory (``meta["preprocess"]`` of the checkpoint,
    FORMATS.md): its ``config.yaml`` and ``dataset.json``, so ``fvlm predict`` and ``fvlm.load``
    preprocess a single scan as the training shards were; None for sources that are not shards."""
    info, root = getattr(source, "info", None), getattr(source, "root", None)
    if not isinstance(info, dict) or root is None:
        return None
    conf = {}
    p = Path(root) / "config.yaml"
    if p.is_file():
        conf = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    return {"config": conf, "dataset": info}


def _diagnoses(cfg: PretrainConfig, source) -> tuple[list[str], list, dict[str, str]]:
    """Diagnosis ids carried as labels, their prompt records, anatomy display names."""
    diags, names = [], {}
    if cfg.data.taxonomy:
        tax = load_taxonomy(cfg.data.taxonomy)
        diags = list(tax.diagnoses)
        names = {a.id: a.name for a in tax.anatomies}
    elif hasattr(source, "diagnoses"):
        diags = [Diagnosis.of(d) for d in source.diagnoses]
    ids = list(cfg.data.diagnoses) or [d.id for d in diags]
    return ids, diags, names


def prepare(cfg: PretrainConfig):
    """Build everything but the engine: ``(source, opts, model, loss, diagnoses)``."""
    source = build_source(cfg.data)
    src_anats = list(source.anatomies)
    anats = list(cfg.data.anatomies) or list(cfg.model.anatomies) or src_anats
    bad = [a for a in anats if a not in src_anats]
    if bad:
        raise FvlmError(f"anatomy {bad[0]!r} is not in the data (it has {', '.join(src_anats)})")
    if cfg.model.mode == "global" or cfg.model_name == "clip":
        anats = []
    cfg.model.anatomies = anats
    if cfg.model.mode == "crop":
        cfg.data.load_crops = True
        # one crop-size key: the model's input (data.crop_size is read for one release)
        if cfg.data.crop_size is not None:
            if list(cfg.model.image.img_size) != list(cfg.data.crop_size):
                raise FvlmError(f"crop mode: data.crop_size {cfg.data.crop_size} differs from model.image.img_size "
                                f"{cfg.model.image.img_size}; the crop size is the model's input: drop data.crop_size")
            log.warning("data.crop_size is deprecated: crops are cut at model.image.img_size; drop the key")
        cfg.data.crop_size = list(cfg.model.image.img_size)
        cfg.data.load_volume = cfg.model.use_global
    elif list(cfg.model.image.img_size) != list(cfg.data.volume_size):
        raise FvlmError(f"model.image.img_size {cfg.model.image.img_size} must equal data.volume_size "
                        f"{cfg.data.volume_size} in {cfg.model.mode} mode")
    if cfg.loss.kind == "sigmoid" and cfg.model.logit_bias_init is None:
        cfg.model.logit_bias_init = -10.0
    diag_ids, diags, names = _diagnoses(cfg, source)
    opts = SampleOptions.from_config(cfg.data, anats, diag_ids, names)
    torch.manual_seed(cfg.train.seed)
    if cfg.loss.aux_weight > 0 and anats:   # the classification head: one logit per label column
        cfg.model.aux_classes = len(diag_ids)
    model = create_model(cfg.model_name, cfg.model)
    groups: dict[str, list[int]] = {}
    for d in diags:
        did = d["id"] if isinstance(d, dict) else d.id
        an = d["anatomy"] if isinstance(d, dict) else d.anatomy
        if did in diag_ids:
            groups.setdefault(an, []).append(diag_ids.index(did))
    groups.setdefault("global", list(range(len(diag_ids))))
    for a in anats:
        groups.setdefault(a, [])
    loss = build_loss(cfg.loss, anats, groups)
    return source, opts, model, loss, diags


def run(cfg: PretrainConfig) -> dict:
    """Train (all ranks call this). Returns the trainer's summary."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rank, world, _ = init_distributed()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise FvlmError(f"--out {out} exists and is not a directory")
    # Nothing is written into ``out`` until the inputs are checked and a resume (if any) was
    # accepted: a refused run leaves the directory byte for byte as it was. Log records made
    # before that are held and written to pretrain.log afterwards.
    log = setup_logging(None, "pretrain", quiet=rank != 0, hold=True)
    source, opts, model, loss_fn, diags = prepare(cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s (%s mode): %d anatomies, %.2fM trainable parameters; %d process(es)",
             cfg.model_name, cfg.model.mode, len(model.anatomies), n_train / 1e6, world)
    train_ids = source.case_ids(cfg.data.train_split)
    if not train_ids:
        raise FvlmError(f"no cases in split '{cfg.data.train_split}' of the data")
    val_ids = check_val_config(cfg, source)  # a val_metric that can never be computed is a ConfigError
    src_anats = list(source.anatomies)

    train_source = open_cache(source, opts, cfg.data.cache) if cfg.data.shards else source
    if train_source is not source:
        log.info("training reads the model-input cache %s", train_source.dir)

    def make_loader(start: int):
        ds = CTStream(train_source, train_ids, opts, cfg.data.batch_size, rank=rank, world=world, seed=cfg.train.seed,
                      start=start, augment=cfg.data.augment, source_anatomies=src_anats)
        # pinned host batches on CUDA, so the trainer's non_blocking copy overlaps compute
        return engine_loader.make_loader(ds, num_workers=cfg.data.num_workers,
                                         prefetch_factor=cfg.data.prefetch_factor,
                                         device=devices.train_device(), persistent_workers=False)

    meta = {"data": opts.to_dict(), "hu_window": list(cfg.data.window), "model_name": cfg.model_name,
            "loss": {"kind": cfg.loss.kind, "calibration": list(cfg.loss.calibration)},
            "anatomy_set": getattr(source, "info", {}).get("anatomy_set") if hasattr(source, "info") else None,
            "taxonomy": cfg.data.taxonomy, "preprocess": _shard_settings(source)}

    def save_model(path, module, step, state_dict=None):
        save_consolidated(path, module, {**meta, "step": step}, model_name=cfg.model_name, state_dict=state_dict)

    validate = None
    if val_ids:
        def validate(module, step):  # noqa: ARG001 - the trainer calls it on rank 0 (every rank under ZeRO-3)
            return quick_validate(module, source, val_ids, opts, diags, batch_size=cfg.val.batch_size,
                                  source_anatomies=src_anats)

    trainer = Trainer(model, loss_fn, make_loader, cfg.train, out, micro_batch=cfg.data.batch_size,
                      save_model=save_model, validate=validate,
                      prepare_batch=lambda batch, dev: prepare_batch(batch, opts, dev, cfg.data.augment))
    trainer.resume()                       # raises (touching nothing) if the directory's run is not this one
    setup_logging(out if rank == 0 else None, "pretrain", quiet=rank != 0)
    if rank == 0:
        dump_config(cfg, out / "config.yaml")
    summary = trainer.fit()
    if rank == 0:
        log.info("done at step %d; model: %s", summary["step"], out / "model.pt")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m fvlm.train`` (what torchrun / the deepspeed launcher start)."""
    p = argparse.ArgumentParser(prog="python -m fvlm.train", description="fvlm pretraining (one rank)")
    p.add_argument("--config", action="append", default=[], help="config file(s), merged in order")
    p.add_argument("--set", action="append", default=[], help="override KEY=VALUE")
    p.add_argument("--out", default=None, help="output directory (config key out_dir)")
    p.add_argument("--data", "--shards", default=None, help="shard directory (config key data.shards)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        with interrupts():
            cfg = load_config(PretrainConfig, files=args.config, sets=args.set, base="train/default.yaml",
                              extra={**({"out_dir": args.out} if args.out else {}),
                                     **({"data": {"shards": args.data}} if args.data else {})} or None)
            summary = run(cfg)
    except FvlmError as e:
        print(f"fvlm.train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:   # SIGINT/SIGTERM (torchrun forwards them): a checkpoint is saved where it could be
        print("fvlm.train: interrupted", file=sys.stderr)
        return 130
    return 0 if not summary.get("interrupted") else 3   # train.stop_after: stopped on purpose, resumable
