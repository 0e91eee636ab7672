"""Moving batches to the model's device: one place for training, validation and evaluation."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["to_device", "module_device", "train_device"]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors of a (nested) dict / list / tuple batch moved to ``device``; other values unchanged.
    The one device move of training, validation, evaluation and the Python API.

    ``non_blocking`` only overlaps the copy with compute when the host tensor is pinned (the
    loader's ``pin_memory`` on CUDA); otherwise it is an ordinary synchronous copy.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def train_device() -> torch.device:
    """The device a training process runs on: its local GPU (``LOCAL_RANK``) when CUDA is visible, else CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")
