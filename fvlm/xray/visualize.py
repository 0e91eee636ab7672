"""Figures of masked image modelling: one row per image, four labelled columns.

Columns: the input image, what the encoder sees (hidden patches filled with a colour no
radiograph has), the reconstruction alone, and the reconstruction pasted into the hidden
patches of the input (visible patches are the input's own pixels). Each row names its
image and the mask ratio it actually got (overall, and inside/outside the chest region
for context-aware masking); the title gives the training step, the caption how the
prediction was de-normalised. Tiles are drawn at their native pixel size (no resampling).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..encoders import patchify, unpatchify
from .masking import patch_to_pixel_mask

__all__ = ["reconstruction_images", "reconstruction_figure", "save_reconstruction_figure", "save_grid",
           "COLUMN_TITLES", "HIDDEN_RGB"]

#: the fill of hidden patches in the "masked" column: a saturated blue, far from any grey
HIDDEN_RGB = (0.10, 0.45, 0.95)
COLUMN_TITLES = {
    "mae": ("input", "masked\n(encoder input)", "reconstruction", "reconstruction\nin hidden patches"),
    "gmml": ("input", "corrupted\n(encoder input)", "reconstruction", "reconstruction\nin corrupted patches"),
}


@torch.no_grad()
def reconstruction_images(batch: dict, pred: torch.Tensor, patch_size, norm_pix: bool, method: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, model input, reconstruction pasted into the hidden patches), (B, 1, H, W) in [0, 1].

    MAE: the input shows hidden patches grey; the reconstruction keeps visible patches and
    fills hidden ones from the prediction (de-normalised with each patch's own statistics
    when the targets were normalised, as MAE's figures do). GMML: input is the corrupted
    image; the reconstruction replaces corrupted patches with the prediction.
    """
    img, shown, rec, pix = _parts(batch, pred, patch_size, norm_pix, method)
    return img, shown, torch.where(pix, rec, img)


def _parts(batch: dict, pred: torch.Tensor, patch_size, norm_pix: bool, method: str):
    """(image, encoder input, full reconstruction, hidden-pixel mask), each (B, 1, H, W)."""
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
    return img, shown, rec, pix


def _ratios(batch: dict, method: str) -> list[str]:
    """Per image: the realised fraction of hidden (or corrupted) patches, inside/outside the chest if known."""
    m = batch["corrupted" if method == "gmml" else "mask"].float().cpu()
    out = []
    for i in range(m.shape[0]):
        s = f"{'corrupted' if method == 'gmml' else 'hidden'} {m[i].mean():.0%}"
        if "inside" in batch and method != "gmml":
            ins = batch["inside"][i].cpu().bool()
            if ins.any():
                s += f" (chest {m[i][ins].mean():.0%}"
                s += f", outside {m[i][~ins].mean():.0%})" if (~ins).any() else ")"
        out.append(s)
    return out


def _rgb(a: torch.Tensor) -> np.ndarray:
    g = a[0].float().clamp(0, 1).numpy()
    return np.repeat(g[..., None], 3, axis=-1)


def reconstruction_figure(batch: dict, pred: torch.Tensor, patch_size, norm_pix: bool, method: str,
                          step: int | None = None, names: Sequence[str] | None = None, max_rows: int = 4):
    """A matplotlib figure of the reconstructions (see the module docstring); tiles at 1 px per pixel.

    ``batch``: the masked batch (``image`` (B, 1, H, W) in [0, 1], ``mask``/``corrupted`` (B, N),
    optionally ``inside`` (B, N)); ``pred``: (B, N, P) patch predictions; ``names``: image ids.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img, shown, rec, pix = _parts(batch, pred, patch_size, norm_pix, method)
    rows = min(max_rows, img.shape[0])
    h, w = img.shape[-2:]
    titles = COLUMN_TITLES["gmml" if method == "gmml" else "mae"]
    ratios = _ratios(batch, method)
    names = list(names) if names is not None else [f"image {int(i)}" for i in batch.get("index", range(rows))]
    what = "hidden" if method != "gmml" else "corrupted"
    norm = ("targets normalised per patch: each predicted patch is shown with the mean and std of the true "
            f"patch (MAE's figure convention), so the brightness and contrast of {what} patches come from "
            "the image; only their structure is predicted") if norm_pix else \
        f"targets are raw pixels in [0, 1] (no per-patch normalisation): {what} patches are shown as predicted"
    fill = "; blue = hidden patch" if method != "gmml" else ""
    dpi, gap, left, top = 100, 8, 200, 52  # pixels
    fw = left + 4 * w + 4 * gap
    caption = textwrap.fill(f"{norm}{fill}; tiles at native resolution ({h}x{w} px).", width=max(40, fw // 5))
    bottom = 14 + 11 * (caption.count("\n") + 1)
    fh = top + rows * (h + gap) + bottom
    fig = plt.figure(figsize=(fw / dpi, fh / dpi), dpi=dpi)
    step_s = f"step {step}" if step is not None else "reconstructions"
    fig.suptitle(f"{'GMML' if method == 'gmml' else 'MAE'} {step_s}", x=0.01, ha="left", y=1 - 8 / fh,
                 va="top", fontsize=10)
    for r in range(rows):
        hidden = pix[r, 0].numpy()
        masked = _rgb(shown[r])
        if method != "gmml":
            masked[hidden] = HIDDEN_RGB
        tiles = (_rgb(img[r]), masked, _rgb(rec[r]), _rgb(torch.where(pix[r], rec[r], img[r])))
        y0 = fh - top - (r + 1) * (h + gap) + gap
        for c, tile in enumerate(tiles):
            ax = fig.add_axes(((left + c * (w + gap)) / fw, y0 / fh, w / fw, h / fh))
            ax.imshow(tile, interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8, pad=3)
        fig.text(6 / fw, (y0 + h / 2) / fh, f"{names[r]}\n{ratios[r]}", fontsize=7, va="center", ha="left")
    fig.text(6 / fw, 6 / fh, caption, fontsize=6.5, va="bottom", ha="left")
    return fig


def save_reconstruction_figure(path: str | os.PathLike, batch: dict, pred: torch.Tensor, patch_size, norm_pix: bool,
                               method: str, step: int | None = None, names: Sequence[str] | None = None,
                               max_rows: int = 4) -> Path:
    """Write :func:`reconstruction_figure` as a PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = reconstruction_figure(batch, pred, patch_size, norm_pix, method, step, names, max_rows)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def save_grid(path: str | os.PathLike, columns: list[torch.Tensor], max_rows: int = 4, tile: int | None = None) -> Path:
    """A bare PNG with one row per image and one column per tensor (each (B, 1, H, W) in [0, 1]).

    No labels: use :func:`save_reconstruction_figure` for a figure people read. ``tile`` resizes
    each image (None = native size).
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = min(max_rows, columns[0].shape[0])
    th, tw = (tile, tile) if tile else tuple(columns[0].shape[-2:])
    canvas = np.zeros((rows * th, len(columns) * tw), np.uint8)
    for r in range(rows):
        for ci, col in enumerate(columns):
            a = (col[r, 0].float().clamp(0, 1).numpy() * 255).astype(np.uint8)
            if tile:
                a = np.asarray(Image.fromarray(a).resize((tw, th), Image.BILINEAR))
            canvas[r * th:(r + 1) * th, ci * tw:(ci + 1) * tw] = a
    canvas[:, ::tw] = 255  # thin separators
    Image.fromarray(canvas).save(path)
    return path
