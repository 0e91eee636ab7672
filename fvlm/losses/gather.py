"""Gathering features from all data-parallel ranks for the contrastive loss.

Every rank gathers the embeddings of all ranks (rank order) and computes the *same* loss
``L`` over the global batch. Gradients flow only into the local slice: the other ranks'
slices are constants (``all_gather`` has no autograd), and the local slice is the
local tensor itself, so ``dL/d(local features)`` is exact. The data-parallel engine then
*averages* parameter gradients over the ``W`` ranks; to make that average equal the
single-process gradient of ``L`` over the concatenated batch, the local slice's gradient is
multiplied by ``W`` on its way back (:class:`_ScaleGrad`). The backward pass needs no
communication beyond the engine's usual gradient all-reduce.

Requirements: every rank passes the same local batch size (the data loader drops last).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_info", "gather_with_grad", "gather_nograd"]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _all_gather(x: torch.Tensor, world: int) -> torch.Tensor:
    """``(B, ...)`` -> ``(W * B, ...)`` in rank order, one collective into one buffer."""
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (W * B, ...)``: all ranks' rows in rank order; gradient reaches only the
    local rows, scaled by ``W`` (see the module docstring). Identity when not distributed."""
    rank, world = world_info()
    if world == 1:
        return x
    b = x.shape[0]
    full = _all_gather(x.detach(), world)
    return torch.cat([full[:rank * b], _ScaleGrad.apply(x, float(world)), full[(rank + 1) * b:]], dim=0)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of a tensor without gradient (labels, masks); bools are supported."""
    rank, world = world_info()
    if world == 1:
        return x
    if x.dtype == torch.bool:
        return _all_gather(x.to(torch.uint8), world).bool()
    return _all_gather(x.detach(), world)
