"""Loading encoder weights from local files, with a mismatch report and 2D -> 3D inflation.

fVLM initialises its 3D ViT from an ImageNet MAE ViT-B; :func:`load_encoder_weights`
takes such a 2D checkpoint and inflates it: the patch projection kernel is resized
in-plane and spread evenly along the extra axis (so a volume constant along that
axis gives the same response as the 2D image), RGB input weights are summed for
one-channel CT, and learned 2D position embeddings are resized and repeated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import FvlmError
from ..torchfile import read_torch_file
from .vit import VisionTransformer

_WRAPPERS = ("model", "state_dict", "module", "encoder")
_PREFIXES = ("module.", "image_encoder.", "encoder.", "backbone.", "visual.")


@dataclass
class LoadReport:
    """What happened to each key when loading weights."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for name in ("inflated", "resized", "missing", "unexpected", "mismatched", "skipped"):
            items = getattr(self, name)
            if items:
                shown = ", ".join(items[:6]) + (" ..." if len(items) > 6 else "")
                parts.append(f"{len(items)} {name} ({shown})")
        return "; ".join(parts)


def _read_state_dict(src) -> dict:
    sd = src if isinstance(src, dict) else read_torch_file(src, "weights file")
    for _ in range(3):
        if not isinstance(sd, dict):
            raise FvlmError("weights file does not hold a state dict")
        inner = next((sd[k] for k in _WRAPPERS if k in sd and isinstance(sd[k], dict)), None)
        if inner is None:
            break
        sd = inner
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _strip(sd: dict, prefix: str | None) -> dict:
    if prefix:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def inflate_patch_kernel(w2d: torch.Tensor, patch_size, in_chans: int) -> torch.Tensor:
    """``(C, c_in, ph, pw)`` 2D kernel -> ``(C, in_chans, px, py, pz)`` 3D kernel.

    In-plane resize to ``(px, py)`` (bilinear, rescaled to keep the summed
    response), then repeated along z and divided by ``pz``.
    """
    out_c, c_in, ph, pw = w2d.shape
    px, py, pz = patch_size
    w = w2d
    if in_chans != c_in:
        if in_chans == 1:
            w = w.sum(dim=1, keepdim=True)
        else:
            w = w.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (c_in / in_chans)
    if (ph, pw) != (px, py):
        w = F.interpolate(w, size=(px, py), mode="bilinear", align_corners=False) * (ph * pw) / (px * py)
    return w.unsqueeze(-1).repeat(1, 1, 1, 1, pz) / pz


def _adapt_2d_kernel(w: torch.Tensor, patch_size, in_chans: int) -> torch.Tensor:
    out_c, c_in, ph, pw = w.shape
    if in_chans != c_in:
        w = w.sum(dim=1, keepdim=True) if in_chans == 1 else w.mean(1, keepdim=True).repeat(1, in_chans, 1, 1)
    if (ph, pw) != tuple(patch_size):
        w = F.interpolate(w, size=tuple(patch_size), mode="bilinear", align_corners=False) * (ph * pw) / math.prod(patch_size)
    return w


def _resize_pos(pe: torch.Tensor, enc: VisionTransformer) -> torch.Tensor:
    """A learned ``(1, [1+]N, C)`` position embedding (2D or same-dims) -> ``(1, enc.num_patches, C)``."""
    c = pe.shape[-1]
    n = pe.shape[1]
    src_grid = None
    for extra in (0, 1):
        m = n - extra
        side = round(m ** 0.5)
        if side * side == m:
            src_grid, pe = (side, side), pe[:, extra:]
            break
    if src_grid is None:
        raise ValueError(f"cannot infer the grid of a position embedding with {n} tokens")
    g = pe.reshape(1, *src_grid, c).movedim(-1, 1)
    if enc.spatial_dims == 2:
        g = F.interpolate(g, size=enc.grid_size, mode="bicubic", align_corners=False)
        return g.movedim(1, -1).reshape(1, -1, c)
    gx, gy, gz = enc.grid_size
    g = F.interpolate(g, size=(gx, gy), mode="bicubic", align_corners=False)
    g = g.unsqueeze(-1).repeat(1, 1, 1, 1, gz)
    return g.movedim(1, -1).reshape(1, -1, c)


def load_encoder_weights(enc: VisionTransformer, src, prefix: str | None = None,
                         strict: bool = False) -> LoadReport:
    """Load weights from a file path or state dict into ``enc``; returns a :class:`LoadReport`.

    Handles wrapper keys (``model``, ``state_dict``), common prefixes (``module.``,
    ``image_encoder.``), 2D -> 3D inflation of the patch kernel, RGB -> gray input,
    position embedding resizing, and a class token absent on either side. With
    ``strict``, any missing/unexpected/mismatched key raises :class:`FvlmError`.
    """
    sd = _strip(_read_state_dict(src), prefix)
    own = enc.state_dict()
    rep = LoadReport()
    new_sd = {}
    for k, v in sd.items():
        if k not in own:
            if k == "pos_embed" and enc.pos_embed_type == "sincos":
                rep.skipped.append("pos_embed (fixed sin-cos here)")
            else:
                rep.unexpected.append(k)
            continue
        target = own[k]
        if v.shape == target.shape:
            new_sd[k] = v
            rep.loaded.append(k)
            continue
        try:
            if k == "patch_embed.proj.weight" and v.ndim == 4 and target.ndim == 5:
                new_sd[k] = inflate_patch_kernel(v, enc.patch_size, enc.in_chans)
                rep.inflated.append(k)
            elif k == "patch_embed.proj.weight" and v.ndim == 4 and target.ndim == 4:
                new_sd[k] = _adapt_2d_kernel(v, enc.patch_size, enc.in_chans)
                rep.resized.append(k)
            elif k == "pos_embed":
                new_sd[k] = _resize_pos(v, enc)
                rep.resized.append(k)
            else:
                rep.mismatched.append(f"{k} {tuple(v.shape)}->{tuple(target.shape)}")
                continue
        except ValueError as e:
            rep.mismatched.append(f"{k} ({e})")
            continue
        if new_sd[k].shape != target.shape:
            rep.mismatched.append(f"{k} {tuple(new_sd.pop(k).shape)}->{tuple(target.shape)}")
    loaded = set(new_sd)
    rep.missing = [k for k in own if k not in loaded and not (k == "pos_embed" and enc.pos_embed_type == "sincos")]
    if strict and (rep.missing or rep.unexpected or rep.mismatched):
        raise FvlmError(f"weights do not match the encoder: {rep.summary()}")
    enc.load_state_dict(new_sd, strict=False)
    return rep
