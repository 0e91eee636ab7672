"""Moved to :mod:`fvlm.engine` (``trainer``, ``config``, ``distributed``, ``schedules``); these
names are kept for one release."""
from ..engine.config import TrainConfig
from ..engine.distributed import deepspeed_config, init_distributed
from ..engine.schedules import build_param_groups, cosine_with_warmup, no_decay_names
from ..engine.trainer import LATEST, Trainer

__all__ = ["TrainConfig", "Trainer", "build_param_groups", "no_decay_names", "cosine_with_warmup", "deepspeed_config",
           "init_distributed", "LATEST"]
