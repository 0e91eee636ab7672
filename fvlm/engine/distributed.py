"""Process group and DeepSpeed setup of the engine: ``init_distributed()`` and the DeepSpeed
config dict built from a :class:`~fvlm.engine.config.TrainConfig`. DeepSpeed is imported when
the process group is started (it is heavy and only a training process needs it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, FvlmError
from ..resources import config_path
from .config import TrainConfig

__all__ = ["init_distributed", "deepspeed_config"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise the process group once (gloo on CPU, nccl on GPU) -> ``(rank, world, local_rank)``.

    Single process without a launcher: sets the env vars a launcher would set.
    """
    import deepspeed

    own_port = "WORLD_SIZE" not in os.environ
    if own_port:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        for attempt in range(5):
            if own_port:
                os.environ["MASTER_PORT"] = str(_free_port())
            try:
                deepspeed.init_distributed(dist_backend=backend, verbose=False)
                break
            except dist.DistNetworkError:
                # another job on this machine took the probed port before we bound it: probe again
                if not own_port or attempt == 4:
                    raise
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world: int) -> dict:
    """The DeepSpeed config dict: the JSON file, with batch/accumulation/clipping/precision from ``cfg``."""
    try:
        p = config_path(cfg.deepspeed_config)
    except FvlmError:
        raise ConfigError(f"train.deepspeed_config: file not found: {cfg.deepspeed_config}") from None
    try:
        ds = json.loads(Path(p).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    ds.pop("_comment", None)
    ds["train_micro_batch_size_per_gpu"] = int(micro_batch)
    ds["gradient_accumulation_steps"] = int(cfg.grad_accum)
    ds["train_batch_size"] = int(micro_batch) * int(cfg.grad_accum) * int(world)
    ds["gradient_clipping"] = float(cfg.clip_grad)
    ds["bf16"] = {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.precision == "fp16", "initial_scale_power": 16}
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.zero_stage is not None:
        if cfg.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0-3, got {cfg.zero_stage}")
        zero["stage"] = int(cfg.zero_stage)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds
