"""One Vision Transformer for 2D and 3D inputs (``spatial_dims`` = 2 or 3).

Inputs are ``(B, C, *spatial)``: ``(B, C, H, W)`` for 2D, ``(B, C, X, Y, Z)`` for 3D
(array order of the shards, see docs/FORMATS.md). Patch sizes may be anisotropic,
e.g. ``(16, 16, 4)`` for CT at 1 x 1 x 3 mm. Inputs of another size than
``img_size`` are accepted when divisible by the patch size; position embeddings
are then recomputed (sin-cos) or interpolated (learned).

Every encoder has the same contract:

- ``forward_features(x, keep=None)`` -> ``(B, P + N, C)`` tokens after the final
  norm (``P = num_prefix_tokens``; ``keep`` = ``(B, K)`` indices of the visible
  patch tokens, for masked autoencoders, -> ``(B, P + K, C)``);
- ``forward_intermediates(x, indices)`` -> list of ``(B, C, *grid)`` maps;
- ``dense(x)`` -> ``(B, C, *grid)``;
- ``no_weight_decay()`` -> names of the parameters that get no weight decay.

Parameter names follow the common ViT layout (``patch_embed.proj``,
``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ``norm``, ``cls_token``,
``pos_embed``), so 2D checkpoints such as MAE's ImageNet ViT-B load by name.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["VisionTransformer", "patchify", "unpatchify", "patch_regions", "patch_to_pixel_mask", "sincos_pos_embed"]


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValueError(f"{name} must have {n} values for spatial_dims={n}, got {v}")
    return v


def sincos_pos_embed(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos position embedding for an N-d grid -> ``(prod(grid), dim)``.

    The channels are split evenly over the axes (each axis gets a multiple of 2
    channels); left-over channels are zero.
    """
    n = len(grid)
    per_axis = (dim // (2 * n)) * 2
    if per_axis == 0:
        raise ValueError(f"embed_dim {dim} too small for a {n}-d sin-cos embedding")
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    half = per_axis // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float32) / half)
    parts = []
    for c in coords:
        out = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, prod(patch_size) * C)`` in raster order of the patch grid."""
    b, c = x.shape[:2]
    sp = x.shape[2:]
    nd = len(sp)
    p = _tuple(patch_size, nd, "patch_size")
    grid = [s // q for s, q in zip(sp, p)]
    if any(s % q for s, q in zip(sp, p)):
        raise ValueError(f"input {tuple(sp)} is not divisible by patch size {p}")
    shape = [b, c]
    for g, q in zip(grid, p):
        shape += [g, q]
    x = x.reshape(shape)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    perm = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    x = x.permute(perm)
    return x.reshape(b, math.prod(grid), math.prod(p) * c)


def patch_regions(masks: torch.Tensor, patch_size: Sequence[int], min_frac: float = 0.5) -> torch.Tensor:
    """(B, H, W) pixel masks -> (B, N) bool: a patch is inside if ``min_frac`` of it is."""
    ph, pw = int(patch_size[0]), int(patch_size[1])
    b, h, w = masks.shape
    if h % ph or w % pw:
        raise ValueError(f"mask {h}x{w} is not divisible by the patch size {ph}x{pw}")
    frac = masks.float().reshape(b, h // ph, ph, w // pw, pw).mean(dim=(2, 4))
    return (frac >= min_frac).reshape(b, -1)


def patch_to_pixel_mask(mask: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """(B, N) patch mask -> (B, 1, H, W) pixel mask of the same dtype."""
    b = mask.shape[0]
    gh, gw = int(grid[0]), int(grid[1])
    m = mask.reshape(b, 1, gh, gw)
    return m.repeat_interleave(int(patch_size[0]), dim=2).repeat_interleave(int(patch_size[1]), dim=3)


def unpatchify(t: torch.Tensor, patch_size: Sequence[int], grid_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, prod(p) * C)`` -> ``(B, C, *spatial)``."""
    b = t.shape[0]
    nd = len(grid_size)
    p = _tuple(patch_size, nd, "patch_size")
    x = t.reshape([b, *grid_size, *p, channels])
    perm = [0, 2 * nd + 1]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    x = x.permute(perm)
    return x.reshape([b, channels, *[g * q for g, q in zip(grid_size, p)]])


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = attn_impl

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.attn_impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # the plain formulation, kept as a baseline for benchmarks and checks
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, attn_impl="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Patchify with a strided convolution; optionally a small convolutional stem first.

    The conv stem (two 3^d convolutions at full resolution) helps small, focal
    structures that a single linear patch projection blurs away.
    """

    def __init__(self, spatial_dims: int, patch_size, in_chans: int, embed_dim: int, stem: str = "linear",
                 stem_channels: int = 16):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        if stem == "conv":
            norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
            self.stem = nn.Sequential(
                conv(in_chans, stem_channels, 3, padding=1), norm(stem_channels, affine=True), nn.GELU(),
                conv(stem_channels, stem_channels, 3, padding=1), norm(stem_channels, affine=True), nn.GELU())
            in_chans = stem_channels
        elif stem == "linear":
            self.stem = nn.Identity()
        else:
            raise ValueError(f"stem must be 'linear' or 'conv', got {stem!r}")
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(self.stem(x))
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class VisionTransformer(nn.Module):
    """A ViT over 2D or 3D inputs with the fvlm encoder contract (see module docstring)."""

    def __init__(self, spatial_dims: int = 3, img_size=(96, 96, 48), patch_size=(16, 16, 8), in_chans: int = 1,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True, pos_embed: str = "sincos",
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False, attn_impl: str = "sdpa",
                 stem: str = "linear"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'math', got {attn_impl!r}")
        self.spatial_dims = spatial_dims
        self.img_size = _tuple(img_size, spatial_dims, "img_size")
        self.patch_size = _tuple(patch_size, spatial_dims, "patch_size")
        bad = [(s, p) for s, p in zip(self.img_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid_size)
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.depth = depth
        self.num_prefix_tokens = 1 if class_token else 0
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(spatial_dims, self.patch_size, in_chans, embed_dim, stem=stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, embed_dim) * 0.02)
        else:
            self.register_buffer("pos_embed", sincos_pos_embed(self.grid_size, embed_dim)[None], persistent=False)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], attn_impl) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    # ------------------------------------------------------------------ init / helpers
    def _init_weights(self):
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that must get no weight decay.

        Decaying biases, norm gains, the class token or a learned position table pulls them
        towards 0 rather than regularising anything; the trainer builds its parameter groups
        from this set instead of guessing from names.
        """
        skip = {"cls_token", "pos_embed"}
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in skip}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def grid_for(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an input of spatial size ``spatial`` (must be divisible by the patch)."""
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"expected a {self.spatial_dims}D input (B, C, {'X, Y, Z' if self.spatial_dims == 3 else 'H, W'}), "
                             f"got spatial shape {tuple(spatial)}")
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(f"input size {tuple(spatial)} is not divisible by patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embedding ``(1, prod(grid), C)`` for a token grid (recomputed or interpolated)."""
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed(grid, self.embed_dim).to(self.pos_embed)[None]
        pe = self.pos_embed.reshape(1, *self.grid_size, self.embed_dim).movedim(-1, 1)
        mode = "trilinear" if self.spatial_dims == 3 else "bicubic"
        pe = F.interpolate(pe, size=grid, mode=mode, align_corners=False)
        return pe.movedim(1, -1).reshape(1, -1, self.embed_dim)

    def _tokens(self, x: torch.Tensor, keep: torch.Tensor | None):
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected input of shape (B, C, *spatial) with {self.spatial_dims} spatial dims, "
                             f"got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channel(s), got {x.shape[1]}")
        grid = self.grid_for(x.shape[2:])
        t = self.patch_embed(x)
        t = t + self.pos_embed_for(grid).to(t.dtype)  # fixed buffers stay fp32 under bf16 engines
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != t.shape[0]:
                raise ValueError(f"keep must be (B, K) token indices, got {tuple(keep.shape)}")
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
        return t, grid

    def _run_block(self, blk, t):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, t, use_reentrant=False)
        return blk(t)

    def _to_map(self, t: torch.Tensor, grid) -> torch.Tensor:
        t = t[:, self.num_prefix_tokens:]
        return t.transpose(1, 2).reshape(t.shape[0], self.embed_dim, *grid)

    # ------------------------------------------------------------------ the contract
    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, P + N, embed_dim)`` (``P + K`` with ``keep``)."""
        t, _ = self._tokens(x, keep)
        for blk in self.blocks:
            t = self._run_block(blk, t)
        return self.norm(t)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | int | None = None,
                              norm: bool = True) -> list[torch.Tensor]:
        """Maps ``(B, embed_dim, *grid)`` after the given blocks (default: 4 evenly spaced, last included).

        ``indices`` are block indices (negative counts from the end) or an int n for the last n blocks.
        """
        if indices is None:
            step = max(1, self.depth // 4)
            indices = sorted({self.depth - 1 - i * step for i in range(min(4, self.depth))})
        elif isinstance(indices, int):
            indices = list(range(self.depth - indices, self.depth))
        idx = sorted({i % self.depth for i in indices})
        if any(i < 0 or i >= self.depth for i in indices if i >= 0) or any(i < -self.depth for i in indices):
            raise ValueError(f"block indices {list(indices)} out of range for depth {self.depth}")
        t, grid = self._tokens(x, None)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = self._run_block(blk, t)
            if i in idx:
                outs.append(self._to_map(self.norm(t) if norm else t, grid))
            if i >= idx[-1]:
                break
        return outs

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, embed_dim, *grid)`` from the last block."""
        grid = self.grid_for(x.shape[2:])
        return self._to_map(self.forward_features(x), grid)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, keep)
