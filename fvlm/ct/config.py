"""Config schema of the CT pretraining program (``fvlm pretrain``; defaults in ``configs/train/default.yaml``).

``data.`` holds every data key (shards, batch_size, num_workers, ...: :class:`fvlm.data.ct.CTDataConfig`),
``train.`` the shared engine's (:class:`fvlm.engine.config.TrainConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..data.ct import CTDataConfig
from ..engine.config import TrainConfig
from ..losses.contrastive import LossConfig
from ..models.fvlm import FVLMConfig

__all__ = ["PretrainConfig", "ValConfig"]


@dataclass
class ValConfig:
    enabled: bool = opt(True, "validate during training (retrieval recall + quick zero-shot AUC)")
    max_cases: int = opt(256, "validation cases used (first N of the split)")
    batch_size: int = opt(16, "validation batch size")


@dataclass
class PretrainConfig:
    out_dir: str = opt("runs/pretrain", "output directory (checkpoints, logs, model.pt)")
    model_name: str = opt("fvlm", "model registry name: fvlm (fine-grained) or clip (global-only baseline)")
    model: FVLMConfig = opt(FVLMConfig(), "the model")
    loss: LossConfig = opt(LossConfig(), "the contrastive loss")
    data: CTDataConfig = opt(CTDataConfig(), "training data")
    train: TrainConfig = opt(TrainConfig(), "optimisation, precision, DeepSpeed, checkpoints, logging")
    val: ValConfig = opt(ValConfig(), "validation during training")
