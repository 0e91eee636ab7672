"""Learning-rate schedule and AdamW parameter groups of the engine."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig

__all__ = ["cosine_with_warmup", "no_decay_names", "build_param_groups"]


def cosine_with_warmup(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after ``step`` optimizer steps."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Full names of the parameters that get no weight decay.

    The outermost module on each branch that has a ``no_weight_decay()`` method names them for
    its subtree (the encoders, :class:`~fvlm.models.fvlm.FVLM`: tokens, position tables, norms,
    biases, temperatures). Parameters of modules without such a method: the 1-d ones (biases,
    norm gains). Nothing is guessed from names.
    """
    out: set[str] = set()
    covered: list[str] = []
    for prefix, mod in model.named_modules():
        if any(prefix == c or prefix.startswith(c + ".") for c in covered):
            continue
        nwd = getattr(mod, "no_weight_decay", None)
        if callable(nwd):
            pre = prefix + "." if prefix else ""
            out |= {pre + n for n in nwd()}
            covered.append(prefix)
            if not prefix:
                break
    inside = lambda n: any(not c or n.startswith(c + ".") for c in covered)  # noqa: E731
    out |= {n for n, p in model.named_parameters() if p.ndim <= 1 and not inside(n)}
    return out


def build_param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: (lr multiplier by longest matching prefix) x (decay / no decay, by
    :func:`no_decay_names`). Frozen params skipped."""
    groups: dict[tuple[float, bool], list] = {}
    prefixes = sorted(cfg.lr_groups, key=len, reverse=True)
    skip = no_decay_names(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((cfg.lr_groups[pf] for pf in prefixes if name.startswith(pf)), 1.0)
        decay = name not in skip
        groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * m, "weight_decay": cfg.weight_decay if d else 0.0, "lr_mult": m}
            for (m, d), ps in groups.items() if m > 0]
