"""Masking strategies for masked image modelling on radiographs, as pure functions.

Every function takes an explicit ``torch.Generator`` (or None for the global one), so a
seed reproduces the masks. Patch indices are in raster order of the token grid, the
order of :func:`fvlm.encoders.patchify` and of the encoder's tokens.

MAE-style (the encoder sees the visible patches only):

- :func:`random_masking` - a uniform random subset is hidden (MAE);
- :func:`context_aware_masking` - patches inside the chest contour are hidden at a
  higher ratio than those outside (e.g. 0.95 vs 0.85), so the model spends its
  reconstruction effort on the lungs rather than on the background;
- :func:`box_region` - the fixed central-box approximation of the chest, as a baseline
  region for :func:`context_aware_masking`.

All of them return a :class:`MaskSample` with a fixed number of visible patches per
image, as a batch needs.

GMML-style (the encoder sees every patch, some of them corrupted):

- :func:`block_masking` - rectangular blocks of patches covering a given fraction;
- :func:`corrupt` - replaces those patches by noise, zeros, or the same place in another
  image of the batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from ..encoders.vit import patch_regions, patch_to_pixel_mask  # noqa: F401 (re-exported: patch geometry lives with patchify)

__all__ = ["MaskSample", "num_visible", "random_masking", "context_aware_masking", "box_region",
           "patch_regions", "block_masking", "corrupt", "patch_to_pixel_mask", "from_keep"]


class MaskSample(NamedTuple):
    keep: torch.Tensor     #: (B, K) long, visible patch indices, ascending
    masked: torch.Tensor   #: (B, N - K) long, hidden patch indices, ascending
    mask: torch.Tensor     #: (B, N) bool, True = hidden (the loss is computed there)


def num_visible(num_patches: int, ratio: float) -> int:
    """Visible patches for a mask ratio (at least one patch stays visible)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, min(num_patches, int(round(num_patches * (1.0 - ratio)))))


def from_keep(keep: torch.Tensor, num_patches: int) -> MaskSample:
    """Complete a (B, K) set of visible indices into a :class:`MaskSample`."""
    keep = keep.sort(dim=1).values
    mask = torch.ones(keep.shape[0], num_patches, dtype=torch.bool, device=keep.device)
    mask.scatter_(1, keep, False)
    masked = mask.nonzero()[:, 1].reshape(keep.shape[0], num_patches - keep.shape[1])
    return MaskSample(keep, masked, mask)


def random_masking(batch: int, num_patches: int, ratio: float,
                   generator: torch.Generator | None = None) -> MaskSample:
    """Hide a uniformly random ``ratio`` of the ``num_patches`` patches of each image."""
    k = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator)
    keep = noise.argsort(dim=1)[:, :k]
    return from_keep(keep, num_patches)


def context_aware_masking(inside: torch.Tensor, ratio_inside: float, ratio_outside: float,
                          generator: torch.Generator | None = None,
                          num_keep: int | None = None) -> MaskSample:
    """Hide patches inside the chest at ``ratio_inside`` and outside at ``ratio_outside``.

    ``inside``: (B, N) bool, True for patches in the chest contour (:func:`patch_regions`).

    A batch needs the same number K of visible patches in every image, but images with
    bigger chests would want fewer. K is the batch mean of what each image would keep
    (or ``num_keep``), and each image splits its K between inside and outside in the
    proportion its own counts ask for, which keeps the *odds* of being visible inside vs
    outside exactly as configured; the realised ratios are exact when all chests in the
    batch have the same size and otherwise deviate by the relative size difference.
    """
    if inside.ndim != 2 or inside.dtype != torch.bool:
        raise ValueError(f"inside must be a (B, N) bool tensor, got {tuple(inside.shape)} {inside.dtype}")
    for r in (ratio_inside, ratio_outside):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"mask ratios must be in [0, 1), got {r}")
    b, n = inside.shape
    inside = inside.cpu()
    n_in = inside.sum(1).double()
    n_out = n - n_in
    w_in, w_out = n_in * (1 - ratio_inside), n_out * (1 - ratio_outside)
    if num_keep is None:
        num_keep = int(round(float((w_in + w_out).mean())))
    k = max(1, min(n, int(num_keep)))
    keeps = []
    for i in range(b):
        tot = float(w_in[i] + w_out[i])
        k_in = int(round(k * float(w_in[i]) / tot)) if tot > 0 else 0
        k_in = max(k - int(n_out[i]), min(int(n_in[i]), k_in))  # both groups must have enough patches
        idx_in = inside[i].nonzero()[:, 0]
        idx_out = (~inside[i]).nonzero()[:, 0]
        p_in = idx_in[torch.randperm(idx_in.numel(), generator=generator)[:k_in]]
        p_out = idx_out[torch.randperm(idx_out.numel(), generator=generator)[:k - k_in]]
        keeps.append(torch.cat([p_in, p_out]))
    return from_keep(torch.stack(keeps), n)


def box_region(grid: Sequence[int], frac: Sequence[float] = (0.7, 0.8),
               center: Sequence[float] = (0.45, 0.5)) -> torch.Tensor:
    """(N,) bool: patches of a ``grid`` = (rows, cols) whose centre lies in the central box.

    ``frac`` = (height, width) of the box and ``center`` = (row, col) of its centre, as
    fractions of the image (defaults as :func:`fvlm.xray.contour.central_box`).
    """
    gh, gw = int(grid[0]), int(grid[1])
    r = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
    c = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
    in_r = (r - center[0]).abs() <= frac[0] / 2
    in_c = (c - center[1]).abs() <= frac[1] / 2
    return (in_r[:, None] & in_c[None, :]).reshape(-1)


def block_masking(batch: int, grid: Sequence[int], fraction: float,
                  generator: torch.Generator | None = None, min_block: int = 4,
                  max_block: float = 0.25, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """GMML group masking: (B, N) bool, True on contiguous rectangular blocks of patches.

    Blocks with an area drawn uniformly from ``min_block`` to ``max_block * N`` patches and a
    log-uniform aspect ratio in ``aspect`` are added at random places until exactly
    ``round(fraction * N)`` patches are covered; the last block is trimmed in raster order
    to land on the target, so the coverage is exact.
    """
    gh, gw = int(grid[0]), int(grid[1])
    n = gh * gw
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corruption fraction must be in [0, 1], got {fraction}")
    target = int(round(fraction * n))
    max_area = max(min_block, int(max_block * n))
    la, lb = math.log(aspect[0]), math.log(aspect[1])
    out = torch.zeros(batch, n, dtype=torch.bool)
    for i in range(batch):
        m = torch.zeros(gh, gw, dtype=torch.bool)
        covered, tries = 0, 0
        while covered < target:
            tries += 1
            u = torch.rand(4, generator=generator).tolist()
            area = min_block + u[0] * (max_area - min_block)
            ar = math.exp(la + u[1] * (lb - la))
            h = max(1, min(gh, int(round(math.sqrt(area * ar)))))
            w = max(1, min(gw, int(round(math.sqrt(area / ar)))))
            if tries > 200:  # tiny grids or a nearly full target: fall back to single patches
                h = w = 1
            top = int(u[2] * (gh - h + 1))
            left = int(u[3] * (gw - w + 1))
            block = torch.zeros(gh, gw, dtype=torch.bool)
            block[top:top + h, left:left + w] = True
            new = (block & ~m).reshape(-1).nonzero()[:, 0]
            if new.numel() == 0:
                continue
            take = new[: target - covered]
            m.view(-1)[take] = True
            covered += take.numel()
        out[i] = m.reshape(-1)
    return out


def corrupt(images: torch.Tensor, corrupted: torch.Tensor, patch_size: Sequence[int], mode: str = "noise",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace the corrupted patches of ``images`` (B, C, H, W).

    ``corrupted``: (B, N) bool from :func:`block_masking`. ``mode``: "noise" (uniform in the
    image's value range), "zeros", "swap" (the same pixels of the next image in the batch,
    as GMML does with other images), or "mixed" (one of the three per image).
    Returns a new tensor; ``images`` is not modified.
    """
    if mode not in ("noise", "zeros", "swap", "mixed"):
        raise ValueError(f"corruption mode must be noise, zeros, swap or mixed, got {mode!r}")
    b, c, h, w = images.shape
    ph, pw = int(patch_size[0]), int(patch_size[1])
    pix = patch_to_pixel_mask(corrupted, (h // ph, w // pw), (ph, pw)).to(images.device)
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    hi = images.amax(dim=(1, 2, 3), keepdim=True)
    noise = lo + (hi - lo) * torch.rand(images.shape, generator=generator).to(images)
    zeros = torch.zeros_like(images)
    other = images.roll(1, dims=0) if b > 1 else noise
    if mode == "mixed":
        choice = torch.randint(0, 3, (b,), generator=generator).to(images.device).view(b, 1, 1, 1)
        repl = torch.where(choice == 0, noise, torch.where(choice == 1, zeros, other))
    else:
        repl = {"noise": noise, "zeros": zeros, "swap": other}[mode]
    return torch.where(pix, repl, images)
