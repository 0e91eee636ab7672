"""Text-driven segmentation: a cost volume of image-text cosine similarities, aggregated
over space and over the prompt set, then upsampled with image guidance.

The idea follows cost-aggregation open-vocabulary segmenters (as in DCXFM): instead of
decoding image features and comparing them with text at the end, compare first and
decode the *comparison*. For ``K`` prompts and ``T`` templates per prompt:

1. cost ``(B, K, T, *grid)`` = cosine(dense image features, text embeddings), both
   projected to a shared width;
2. an embedding conv turns the ``T`` template costs of one prompt into ``D`` channels;
3. aggregation blocks alternate
   - **spatial**: a residual conv block applied to each prompt's map independently
     (prompts folded into the batch), with projected image features as guidance;
   - **class**: self-attention across the ``K`` prompts at every location, with the
     projected text embedding as guidance and *no* positional encoding over prompts,
     so permuting the prompts permutes the output maps and nothing else;
4. guided upsampling back to input resolution: per-prompt maps are upsampled stage by
   stage and concatenated with skip features from the encoder and the image (shared
   across prompts, :class:`fvlm.models.dense_heads.SkipPyramid`), then one logit per prompt.

Output: logits ``(B, K, *spatial)``, one independent (sigmoid) map per prompt, so prompt
sets of any size, order and overlap are allowed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dense_heads import ConvBlock, SkipPyramid, _conv, make_upsample, stage_channels, upsample_plan

__all__ = ["CostVolume", "SpatialAggregation", "ClassAggregation", "TextSegHead", "as_prompt_tensor"]


def as_prompt_tensor(text: torch.Tensor, batch: int) -> torch.Tensor:
    """Text embeddings ``(K, E)``, ``(K, T, E)`` or ``(B, K, T, E)`` -> ``(B, K, T, E)``."""
    if text.ndim == 2:
        text = text[:, None]
    if text.ndim == 3:
        text = text[None].expand(batch, -1, -1, -1)
    if text.ndim != 4 or text.shape[0] != batch:
        raise ValueError(f"text embeddings must be (K, E), (K, T, E) or (B, K, T, E) with B={batch}, "
                         f"got {tuple(text.shape)}")
    return text


class CostVolume(nn.Module):
    """Cosine similarities ``(B, K, T, *grid)`` between projected image features and text embeddings."""

    def __init__(self, spatial_dims: int, feat_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.img = _conv(spatial_dims)(feat_dim, dim, 1)
        self.txt = nn.Linear(text_dim, dim)

    def forward(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b = feat.shape[0]
        f = F.normalize(self.img(feat).flatten(2), dim=1)  # (B, D, N)
        t = F.normalize(self.txt(text), dim=-1)  # (B, K, T, D)
        cost = torch.einsum("bdn,bktd->bktn", f, t)
        return cost.reshape(*cost.shape[:3], *feat.shape[2:])


class SpatialAggregation(nn.Module):
    """Residual conv block over each prompt's map (prompts folded into the batch), image-guided."""

    def __init__(self, spatial_dims: int, dim: int, guide_dim: int):
        super().__init__()
        conv = _conv(spatial_dims)
        self.norm = nn.GroupNorm(1, dim)
        self.body = nn.Sequential(conv(dim + guide_dim, dim, 3, padding=1), nn.GELU(), conv(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor, guide: torch.Tensor, k: int) -> torch.Tensor:
        # x: (B*K, D, *g); guide: (B, G, *g), shared by the K prompts of a sample
        g = guide.repeat_interleave(k, dim=0)
        return x + self.body(torch.cat([self.norm(x), g], 1))


class ClassAggregation(nn.Module):
    """Self-attention across prompts at each location; text guidance joins queries and keys.

    No positional encoding over prompts: the block is permutation-equivariant in ``K``.
    """

    def __init__(self, dim: int, text_dim: int, heads: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"aggregation width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim + text_dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # x: (B, K, D, *g); text: (B, K, Dt) guidance per prompt
        b, k, d = x.shape[:3]
        sp = x.shape[3:]
        t = x.flatten(3).permute(0, 3, 1, 2).reshape(-1, k, d)  # (B*N, K, D)
        n = t.shape[0] // b
        g = text[:, None].expand(b, n, k, text.shape[-1]).reshape(b * n, k, -1)
        h = self.norm(t)
        q, kk = self.qk(torch.cat([h, g], -1)).chunk(2, -1)
        v = self.v(h)
        hd = d // self.heads

        def split(z):
            return z.reshape(z.shape[0], k, self.heads, hd).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(q), split(kk), split(v))
        t = t + self.proj(a.transpose(1, 2).reshape(-1, k, d))
        t = t + self.mlp(self.norm2(t))
        return t.reshape(b, n, k, d).permute(0, 2, 3, 1).reshape(b, k, d, *sp)


class TextSegHead(nn.Module):
    """Prompt-conditioned segmentation head (cost volume -> aggregation -> guided upsampling).

    ``forward(feats, image, text)``: ``feats`` encoder maps shallow -> deep, each
    ``(B, embed_dim, *grid)``; ``image`` ``(B, in_chans, *spatial)``; ``text`` embeddings
    ``(K, E)``, ``(K, T, E)`` or ``(B, K, T, E)``. Returns logits ``(B, K, *spatial)``.
    """

    def __init__(self, spatial_dims: int, embed_dim: int, patch_size: Sequence[int], num_levels: int,
                 text_dim: int, cost_dim: int = 64, agg_dim: int = 32, agg_blocks: int = 2, guide_dim: int = 32,
                 text_guide_dim: int = 32, templates: int = 1, heads: int = 2, min_channels: int = 8,
                 in_chans: int = 1, stem_channels: int = 8, learned_stages: int | None = 2,
                 upsample: str = "transposed"):
        super().__init__()
        self.sd = spatial_dims
        self.num_levels = num_levels
        self.templates = templates
        self.cost = CostVolume(spatial_dims, embed_dim, text_dim, cost_dim)
        conv = _conv(spatial_dims)
        self.embed = conv(templates, agg_dim, 3, padding=1)
        self.img_guide = conv(embed_dim, guide_dim, 1)
        self.txt_guide = nn.Linear(text_dim, text_guide_dim)
        self.spatial = nn.ModuleList([SpatialAggregation(spatial_dims, agg_dim, guide_dim) for _ in range(agg_blocks)])
        self.classwise = nn.ModuleList([ClassAggregation(agg_dim, text_guide_dim, heads) for _ in range(agg_blocks)])
        full = upsample_plan(patch_size)
        # per-prompt decoding is K times the work of a plain head: only the first
        # `learned_stages` upsamplings are learned (with guidance); the rest is interpolation
        n = len(full) if learned_stages is None else max(1, min(learned_stages, len(full)))
        self.plan = full[:n]
        self.final_scale = None if n == len(full) else tuple(
            int(np.prod([f[a] for f in full[n:]])) for a in range(spatial_dims))
        ch = stage_channels(n, agg_dim, min_channels)
        # guidance skips are narrower than the per-prompt path: they are repeated K times
        gch = [max(4, c // 2) for c in ch]
        partial = [int(np.prod([f[a] for f in self.plan])) for a in range(spatial_dims)]
        self.pyramid = SkipPyramid(spatial_dims, embed_dim, partial, num_levels, gch, in_chans,
                                   stem_channels, full_patch=patch_size, upsample=upsample)
        self.ups = nn.ModuleList([make_upsample(upsample, spatial_dims, ch[s], ch[s + 1], f)
                                  for s, f in enumerate(self.plan)])
        self.blocks = nn.ModuleList([ConvBlock(spatial_dims, ch[s + 1] + self.pyramid.out_channels[s + 1], ch[s + 1])
                                     for s in range(n)])
        self.out = conv(ch[n], 1, 1)

    def aggregate(self, feats: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """Aggregated cost at the token grid, ``(B, K, agg_dim, *grid)``."""
        top = feats[-1]
        b = top.shape[0]
        text = as_prompt_tensor(text, b)
        if text.shape[2] != self.templates:
            raise ValueError(f"head built for {self.templates} template(s) per prompt, got {text.shape[2]}")
        k = text.shape[1]
        cost = self.cost(top, text)  # (B, K, T, *g)
        x = self.embed(cost.flatten(0, 1))  # (B*K, D, *g)
        guide = self.img_guide(top)
        tg = self.txt_guide(text.mean(2))  # (B, K, Dt)
        for sp, cl in zip(self.spatial, self.classwise):
            x = sp(x, guide, k)
            x = cl(x.reshape(b, k, *x.shape[1:]), tg).flatten(0, 1)
        return x.reshape(b, k, *x.shape[1:])

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if len(feats) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} encoder levels, got {len(feats)}")
        x = self.aggregate(feats, text)
        b, k = x.shape[:2]
        z = x.flatten(0, 1)
        skips = self.pyramid(feats, image)
        for up, block, skip in zip(self.ups, self.blocks, skips):
            z = up(z)
            if skip is not None:
                z = torch.cat([z, skip.repeat_interleave(k, dim=0)], 1)
            z = block(z)
        z = self.out(z)
        if self.final_scale is not None:
            z = F.interpolate(z, size=tuple(image.shape[2:]), mode="trilinear" if self.sd == 3 else "bilinear",
                              align_corners=False)
        return z.reshape(b, k, *z.shape[2:])
