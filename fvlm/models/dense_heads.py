"""Segmentation head: progressive upsampling over multi-level encoder features, 2D or 3D.

A lighter cousin of UNETR's decoder. The deepest feature map is the bottleneck; it is
upsampled stage by stage (one transposed convolution per stage, factor 2 per axis
until the patch size is undone) back to the input resolution. Shallower encoder maps
join as skips at the coarser stages, each brought to its stage's resolution by a
single learned transposed convolution (UNETR uses a chain of them); a small
convolutional stem on the input image joins at the last, full-resolution stage, so
edges finer than a patch can be recovered.

All tensors are ``(B, C, *spatial)``: ``(B, C, H, W)`` or ``(B, C, X, Y, Z)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["upsample_plan", "ConvBlock", "SkipPyramid", "SegHead", "stage_channels", "Upsample", "make_upsample",
           "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("transposed", "interp")


def _conv(sd: int):
    return nn.Conv3d if sd == 3 else nn.Conv2d


def _convT(sd: int):
    return nn.ConvTranspose3d if sd == 3 else nn.ConvTranspose2d


class Upsample(nn.Module):
    """Interpolate then convolve (no checkerboard): ``(B, cin, *s)`` -> ``(B, cout, *(s * factor))``.

    The convolution runs at the lower resolution first when it is a 1^d projection
    (``kernel=1``, cheap), after the interpolation otherwise (a 3^d smoothing conv).
    """

    def __init__(self, sd: int, cin: int, cout: int, factor: Sequence[int], kernel: int = 3):
        super().__init__()
        self.sd = sd
        self.factor = tuple(int(f) for f in factor)
        self.kernel = kernel
        self.conv = _conv(sd)(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x):
        if self.kernel == 1:
            x = self.conv(x)
        if any(f > 1 for f in self.factor):
            x = nn.functional.interpolate(x, scale_factor=self.factor, mode="trilinear" if self.sd == 3 else "bilinear",
                                          align_corners=False)
        return x if self.kernel == 1 else self.conv(x)


def make_upsample(mode: str, sd: int, cin: int, cout: int, factor: Sequence[int], kernel: int = 3) -> nn.Module:
    """A learned upsampling by ``factor``: ``transposed`` (kernel = stride = factor) or ``interp`` (:class:`Upsample`)."""
    if mode == "interp":
        return Upsample(sd, cin, cout, factor, kernel)
    if mode != "transposed":
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    f = tuple(int(a) for a in factor)
    return _convT(sd)(cin, cout, kernel_size=f, stride=f)


def upsample_plan(patch_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-stage, per-axis upsampling factors whose products undo ``patch_size``.

    Factor 2 per stage while an axis still has an even factor left, so ``(8, 8, 4)`` gives
    ``[(2,2,2), (2,2,2), (2,2,1)]``; an odd remainder is taken in one step.
    """
    rem = [int(p) for p in patch_size]
    if any(p < 1 for p in rem):
        raise ValueError(f"patch size must be positive, got {tuple(patch_size)}")
    plan = []
    while any(r > 1 for r in rem):
        f = tuple(2 if r % 2 == 0 else r if r > 1 else 1 for r in rem)
        plan.append(f)
        rem = [r // a for r, a in zip(rem, f)]
    return plan


def stage_channels(n_stages: int, base: int, minimum: int) -> list[int]:
    """Decoder widths: ``base`` at the bottleneck, halving per stage, never below ``minimum``."""
    return [max(minimum, base // 2 ** s) for s in range(n_stages + 1)]


class ConvBlock(nn.Module):
    """Two 3^d convolutions with instance norm and GELU, plus a residual projection."""

    def __init__(self, sd: int, cin: int, cout: int):
        super().__init__()
        conv = _conv(sd)
        norm = nn.InstanceNorm3d if sd == 3 else nn.InstanceNorm2d
        self.body = nn.Sequential(conv(cin, cout, 3, padding=1), norm(cout, affine=True), nn.GELU(),
                                  conv(cout, cout, 3, padding=1), norm(cout, affine=True))
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class SkipPyramid(nn.Module):
    """Per-stage skip features from the encoder maps and the input image.

    ``forward(feats, image)`` -> list over stages ``1..n`` of ``(B, c_s, *res_s)`` or None,
    where ``res_s = grid * prod(plan[:s])``. ``feats`` are the encoder maps from shallow to
    deep; the deepest is the bottleneck and not used here. The next-deepest joins stage 1,
    the one before stage 2, and so on (deeper = coarser, as in UNETR); maps beyond the
    number of intermediate stages join the last intermediate one.
    """

    def __init__(self, spatial_dims: int, embed_dim: int, patch_size: Sequence[int], num_levels: int,
                 channels: Sequence[int], in_chans: int = 1, stem_channels: int = 16,
                 full_patch: Sequence[int] | None = None, upsample: str = "transposed"):
        super().__init__()
        self.sd = spatial_dims
        self.plan = upsample_plan(patch_size)
        # decoding stops short of the input resolution: the image stem is pooled down to it
        self.pool = None if full_patch is None or tuple(full_patch) == tuple(patch_size) else tuple(
            int(f) // int(p) for f, p in zip(full_patch, patch_size))
        n = len(self.plan)
        if n == 0:
            raise ValueError("patch size 1 needs no upsampling head")
        self.num_levels = num_levels
        self.assign: list[int] = []  # stage (1-based) of skip j (j = 0 is the next-deepest map)
        self.projs = nn.ModuleList()
        for j in range(num_levels - 1):
            s = min(j + 1, max(n - 1, 1))
            f = [math.prod(p[a] for p in self.plan[:s]) for a in range(spatial_dims)]
            if all(a == 1 for a in f):
                self.projs.append(_conv(spatial_dims)(embed_dim, channels[s], 1))
            else:
                self.projs.append(make_upsample(upsample, spatial_dims, embed_dim, channels[s], f, kernel=1))
            self.assign.append(s)
        self.stem = ConvBlock(spatial_dims, in_chans, stem_channels) if stem_channels else None
        self.out_channels = [0] * (n + 1)
        for j, s in enumerate(self.assign):
            self.out_channels[s] += channels[s]
        if self.stem is not None:
            self.out_channels[n] += stem_channels

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor) -> list[torch.Tensor | None]:
        n = len(self.plan)
        per_stage: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]
        skips = list(feats[:-1])[::-1]  # deep -> shallow
        for j, (proj, s) in enumerate(zip(self.projs, self.assign)):
            per_stage[s].append(proj(skips[j]))
        if self.stem is not None:
            if self.pool is not None:
                pool = nn.functional.avg_pool3d if self.sd == 3 else nn.functional.avg_pool2d
                image = pool(image, self.pool, self.pool)
            per_stage[n].append(self.stem(image))
        return [torch.cat(p, 1) if p else None for p in per_stage[1:]]


class SegHead(nn.Module):
    """Progressive-upsampling segmentation head.

    ``forward(feats, image)``: ``feats`` = list of ``(B, embed_dim, *grid)`` encoder maps,
    shallow to deep (``encoder.forward_intermediates(x, levels)``); ``image`` the encoder's
    input ``(B, in_chans, *spatial)``. Returns logits ``(B, num_classes, *spatial)``.
    """

    def __init__(self, spatial_dims: int, embed_dim: int, patch_size: Sequence[int], num_levels: int,
                 num_classes: int, base_channels: int = 128, min_channels: int = 16, in_chans: int = 1,
                 stem_channels: int = 16, upsample: str = "transposed"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(patch_size) != spatial_dims:
            raise ValueError(f"patch_size {tuple(patch_size)} does not have {spatial_dims} values")
        if num_levels < 1:
            raise ValueError("the head needs at least one encoder level")
        self.sd = spatial_dims
        self.num_levels = num_levels
        self.plan = upsample_plan(patch_size)
        n = len(self.plan)
        ch = stage_channels(n, base_channels, min_channels)
        self.pyramid = SkipPyramid(spatial_dims, embed_dim, patch_size, num_levels, ch, in_chans, stem_channels,
                                   upsample=upsample)
        conv = _conv(spatial_dims)
        self.bottleneck = conv(embed_dim, ch[0], 1)
        self.ups = nn.ModuleList([make_upsample(upsample, spatial_dims, ch[s], ch[s + 1], f)
                                  for s, f in enumerate(self.plan)])
        self.blocks = nn.ModuleList([ConvBlock(spatial_dims, ch[s + 1] + self.pyramid.out_channels[s + 1], ch[s + 1])
                                     for s in range(n)])
        self.out = conv(ch[n], num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        if len(feats) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} encoder levels, got {len(feats)}")
        skips = self.pyramid(feats, image)
        z = self.bottleneck(feats[-1])
        for up, block, skip in zip(self.ups, self.blocks, skips):
            z = up(z)
            z = block(torch.cat([z, skip], 1) if skip is not None else z)
        return self.out(z)
