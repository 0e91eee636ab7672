"""From dataset samples to training batches with masks, and the model+loss module that trains on them.

:class:`XrayCollate` stacks samples and draws the masks on the CPU (in DataLoader workers):

- MAE: ``keep`` (B, K), ``mask`` (B, N) from the configured strategy;
- GMML: ``corrupted`` (B, N) blocks and ``input`` (B, 1, H, W), the corrupted images.

:class:`XrayStream` is the endless, deterministic batch stream of one rank that the shared
training engine (:class:`fvlm.engine.trainer.Trainer`) resumes by position.

:class:`XrayPretrainTask` wraps :class:`~fvlm.models.xray_mae.XrayMAE` and the matching
loss of :mod:`fvlm.losses.mae`; ``task(batch)`` returns ``{"loss", "pred"}``. It is the one
module the training engine sees.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.stream import BatchStream
from ..errors import FvlmError
from ..losses.mae import GMMLLoss, MAELoss
from . import masking

__all__ = ["XrayCollate", "XrayStream", "XrayPretrainTask"]


class XrayCollate:
    """Collate function: ``list[sample] -> batch dict`` with masks drawn per the mask config.

    ``generator``: a ``torch.Generator`` for reproducible masks (None: the global RNG,
    which DataLoader seeds differently in every worker); a generator given to the call wins.
    """

    def __init__(self, mask_cfg, patch_size: int | Sequence[int], generator: torch.Generator | None = None):
        self.cfg = mask_cfg
        self.patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.generator = generator

    def __call__(self, samples: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "valid", "contour", "index")}
        return self.add_masks(batch, generator)

    def add_masks(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        c, g = self.cfg, generator if generator is not None else self.generator
        img = batch["image"]
        b, _, h, w = img.shape
        grid = (h // self.patch[0], w // self.patch[1])
        n = grid[0] * grid[1]
        if c.method == "gmml":
            corrupted = masking.block_masking(b, grid, c.gmml_fraction, generator=g, min_block=c.gmml_min_block,
                                              max_block=c.gmml_max_block)
            batch["corrupted"] = corrupted
            batch["input"] = masking.corrupt(img, corrupted, self.patch, c.gmml_corruption, generator=g)
            return batch
        if c.strategy == "random":
            ms = masking.random_masking(b, n, c.ratio, generator=g)
        else:
            if c.strategy == "context":
                inside = masking.patch_regions(batch["contour"], self.patch, c.region_min_frac)
            else:
                inside = masking.box_region(grid, c.box_frac, c.box_center)[None].expand(b, -1)
            ms = masking.context_aware_masking(inside, c.ratio_inside, c.ratio_outside, generator=g)
            batch["inside"] = inside
        batch["keep"], batch["mask"] = ms.keep, ms.mask
        return batch


class XrayStream(BatchStream):
    """An endless, deterministic stream of masked batches for one rank.

    Image order: permutations of the dataset seeded by ``(seed, epoch)`` laid end to end;
    global batch ``b`` takes the next ``batch_size * world`` images of that sequence and rank
    ``r`` its ``r``-th block, so no image is dropped and a dataset smaller than a batch still
    works. Flips and masks of batch ``b`` are drawn from ``(seed, rank, b)``. With ``W``
    loader workers, worker ``w`` builds ``start + w, start + w + W, ...`` and the DataLoader's
    in-order round robin returns them in stream order, so a stream started at micro-batch
    ``start`` continues an interrupted run exactly.

    ``dataset``: an :class:`~fvlm.xray.data.XrayDataset` (``len``, ``sample(i, rng)``).
    """

    def __init__(self, dataset, collate: XrayCollate, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, start: int = 0):
        super().__init__()

        if len(dataset) == 0:
            raise FvlmError("no training images: the dataset is empty")
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.rank, self.world = int(batch_size), int(rank), int(world)
        self.seed, self.start = int(seed), int(start)
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, b: int) -> list[int]:
        """Dataset indices of stream batch ``b`` for this rank."""
        n = len(self.dataset)
        first = (b * self.world + self.rank) * self.batch_size
        out = []
        for g in range(first, first + self.batch_size):
            epoch, k = divmod(g, n)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
            out.append(int(self._perm[1][k]))
        return out

    def make(self, b: int) -> dict:
        rng = np.random.default_rng([self.seed, self.rank, b])
        samples = [self.dataset.sample(i, rng) for i in self.indices(b)]
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        return self.collate(samples, gen)


class XrayPretrainTask(nn.Module):
    """Model + loss: ``forward(batch) -> {"loss": scalar, "pred": (B, N, D)}``.

    The network input is cast to the weights' dtype (bf16 engines); targets and the loss stay
    in the batch's float32.
    """

    def __init__(self, model, mask_cfg):
        super().__init__()

        self.model = model
        self.method = mask_cfg.method
        if self.method == "gmml":
            self.loss = GMMLLoss(model.patch_size, norm_pix=False, l1=mask_cfg.gmml_l1)
        else:
            self.loss = MAELoss(model.patch_size, norm_pix=mask_cfg.norm_pix)

    def forward(self, batch: dict) -> dict:
        img = batch["image"]
        dt = self.model.decoder_embed.weight.dtype
        if self.method == "gmml":
            out = self.model(batch["input"].to(dt))
            loss = self.loss(out["pred"].float(), img, batch["corrupted"], batch.get("valid"))
        else:
            out = self.model(img.to(dt), keep=batch["keep"])
            loss = self.loss(out["pred"].float(), img, batch["mask"], batch.get("valid"))
        return {"loss": loss, "pred": out["pred"]}
