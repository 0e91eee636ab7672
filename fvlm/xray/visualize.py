"""PNG grids of masked image modelling: one row per image, original | model input | reconstruction."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["reconstruction_images", "save_grid"]


@torch.no_grad()
def reconstruction_images(batch: dict, pred: torch.Tensor, patch_size, norm_pix: bool, method: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, model input, reconstruction) as (B, 1, H, W) tensors in [0, 1].

    MAE: the input shows hidden patches grey; the reconstruction keeps visible patches and
    fills hidden ones from the prediction (de-normalised with each patch's own statistics
    when the targets were normalised, as MAE's figures do). GMML: input is the corrupted
    image; the reconstruction replaces corrupted patches with the prediction.
    """
    from ..encoders import patchify, unpatchify
    from .masking import patch_to_pixel_mask

    img = batch["image"].float().cpu()
    pred = pred.detach().float().cpu()
    b, c, h, w = img.shape
    grid = (h // patch_size[0], w // patch_size[1])
    if norm_pix:
        t = patchify(img, patch_size)
        mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True, unbiased=False)
        pred = pred * (var + 1e-6).sqrt() + mean
    rec = unpatchify(pred, patch_size, grid, c).clamp(0, 1)
    key = "corrupted" if method == "gmml" else "mask"
    pix = patch_to_pixel_mask(batch[key].cpu(), grid, patch_size)
    if method == "gmml":
        shown = batch["input"].float().cpu().clamp(0, 1)
    else:
        shown = torch.where(pix, torch.full_like(img, 0.5), img)
    return img, shown, torch.where(pix, rec, img)


def save_grid(path: str | os.PathLike, columns: list[torch.Tensor], max_rows: int = 4, tile: int = 256) -> Path:
    """Write a PNG with one row per image and one column per tensor (each (B, 1, H, W) in [0, 1])."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = min(max_rows, columns[0].shape[0])
    canvas = np.zeros((rows * tile, len(columns) * tile), np.uint8)
    for r in range(rows):
        for ci, col in enumerate(columns):
            a = (col[r, 0].float().clamp(0, 1).numpy() * 255).astype(np.uint8)
            im = Image.fromarray(a).resize((tile, tile), Image.BILINEAR)
            canvas[r * tile:(r + 1) * tile, ci * tile:(ci + 1) * tile] = np.asarray(im)
    canvas[:, ::tile] = 255  # thin separators
    Image.fromarray(canvas).save(path)
    return path
