"""The engine's config section (``train:`` of every training program): schedule, optimizer,
precision, DeepSpeed, checkpoints, logging. Torch-free, so the command-line parsers can build
their schemas without loading torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import opt

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimizer steps")
    grad_accum: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak (cosine)")
    warmup_steps: int = opt(100, "linear warm-up steps")
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to biases, norms, 1-d params)")
    betas: tuple[float, float] = opt((0.9, 0.98), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    lr_groups: dict[str, float] = opt({}, "learning-rate multipliers by parameter-name prefix, "
                                      "e.g. {image_encoder.: 0.5, text_encoder.: 0.1}")
    clip_grad: float = opt(1.0, "gradient clipping (global norm; 0 = off)")
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "training precision (fp16 needs a GPU)")
    deepspeed_config: str = opt("deepspeed/zero2.json", "DeepSpeed JSON (path or name under configs/)")
    zero_stage: int | None = opt(None, "override the JSON's ZeRO stage (0-3)")
    seed: int = opt(0, "seed of model init, data order and augmentation")
    log_every: int = opt(10, "log every N steps (TensorBoard, CSV, log file)")
    ckpt_every: int = opt(500, "save a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(2, "resumable checkpoints kept (oldest deleted)")
    val_every: int = opt(0, "validate every N steps (0 = only at the end, if validation is on)")
    val_metric: str = opt("", "metric that selects best.pt (e.g. val/auc_mean); empty = no best.pt")
    val_mode: Literal["max", "min"] = opt("max", "whether val_metric is better high or low")
    resume: str = opt("auto", "auto (continue from out_dir's latest checkpoint if any), never, "
                      "or a checkpoint directory")
    tensorboard: bool = opt(True, "write TensorBoard events to out_dir/tb")
    threads: int = opt(0, "torch CPU threads per process (0 = torch default)")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many steps of this run (0 = off; "
                          "testing and time-sliced jobs)")

    def __post_init__(self):   # load_config turns a ValueError into one "invalid config section" line
        for key, least in (("steps", 1), ("grad_accum", 1), ("warmup_steps", 0), ("keep_checkpoints", 1),
                           ("log_every", 1), ("ckpt_every", 0), ("val_every", 0), ("stop_after", 0),
                           ("threads", 0)):
            v = getattr(self, key)
            if isinstance(v, int) and not isinstance(v, bool) and v < least:
                raise ValueError(f"train.{key} must be {least} or more, got {v}")
