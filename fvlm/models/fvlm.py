"""The fVLM model: anatomy-level image and text embeddings in one space (plus a global pair).

Image side (``image_encoder``, the shared 3D ViT):

- ``mode: volume``: encode the whole volume once; for each anatomy, a learnable query per
  encoder level attends only to the tokens whose patch overlaps the anatomy's mask
  (``forward_intermediates`` levels, pooled vectors concatenated), then a per-anatomy
  projection head maps to the shared embedding size;
- ``mode: crop``: encode each present anatomy's crop and pool it the same way (query restricted
  to the crop's mask);
- ``mode: global``: the CLIP baseline: only the global pair (whole volume <-> report);
- the global embedding (whole volume, all tokens) is trained alongside when ``use_global``.

Text side: a Hugging Face encoder (``fvlm.encoders.TextEncoder``), frozen or trained; with a
frozen encoder, each distinct sentence is encoded once (in fixed-shape groups, so its features
do not depend on the batch it first came in) and cached. Projection shared by all
anatomies or one per anatomy (and one for the global text).

Anti-collapse options for near-identical scans: ``center_image`` (subtract the per-anatomy
batch mean of image outputs, running mean at eval: batch norm without scale) and
``text.center`` (subtract each anatomy's running mean text feature before projection).

The forward pass returns embeddings and masks for the loss; it computes no loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import opt
from ..encoders import create_encoder, load_encoder_weights
from ..errors import ConfigError, FvlmError

__all__ = ["ImageConfig", "TextConfig", "FVLMConfig", "FVLM"]

GLOBAL = "global"


@dataclass
class ImageConfig:
    encoder: str = opt("vit3d_tiny", "encoder name in fvlm.encoders (list_encoders())")
    img_size: list[int] = opt([64, 64, 32], "encoder input [X, Y, Z] (volume mode: the volume; crop mode: a crop)")
    patch_size: list[int] = opt([8, 8, 4], "patch size [x, y, z]")
    encoder_args: dict[str, Any] = opt({}, "extra encoder arguments, e.g. {depth: 4, embed_dim: 96, num_heads: 4}")
    levels: list[int] = opt([-1], "encoder blocks whose outputs are pooled (negative = from the end)")
    pool: Literal["query", "mean", "topk"] = opt(
        "query", "anatomy pooling over the tokens of the anatomy's mask: a learnable query per anatomy and "
        "level (attention), the mean of the tokens, or per channel the mean of the top-k tokens (k = "
        "pool_topk; 1 = max pooling, multiple-instance style: one token holding a small finding is enough)")
    pool_topk: int = opt(1, "tokens averaged per channel by pool: topk (1 = max)")
    pool_heads: int = opt(1, "attention heads of the anatomy query pooling")
    mask_threshold: float = opt(0.0, "a token belongs to an anatomy when more than this fraction of its patch does")
    global_pool: Literal["mean", "query"] = opt("mean", "global embedding: mean of all tokens, or a learnable query")
    grad_checkpointing: bool = opt(False, "recompute encoder blocks in backward (saves memory)")
    pretrained: str | None = opt(None, "encoder weights to start from (load_encoder_weights)")


@dataclass
class TextConfig:
    model_dir: str | None = opt(None, "local Hugging Face model directory (null = the shipped MiniLM; "
                                "'tiny-random' = a small random BERT for tests)")
    max_tokens: int = opt(64, "tokens per text (longer texts are truncated)")
    pooling: Literal["mean", "cls"] = opt("mean", "sentence embedding: mean of tokens or the CLS token")
    freeze: bool = opt(True, "freeze the text encoder (then sentence features are cached)")
    cache: bool = opt(True, "cache frozen sentence features (encode each distinct text once)")
    cache_size: int = opt(500000, "max cached texts")
    encode_group: int = opt(32, "a frozen encoder encodes new texts in groups of exactly this many, padded to "
                            "max_tokens, so features never depend on the batch (exact resume)")
    projection: Literal["shared", "per_anatomy"] = opt("per_anatomy", "text projection head(s)")
    center: bool = opt(False, "subtract each anatomy's running-mean text feature before projection")
    center_momentum: float = opt(0.99, "momentum of that running mean")


@dataclass
class FVLMConfig:
    mode: Literal["volume", "crop", "global"] = opt("volume", "image side: whole volume + anatomy queries, "
                                                    "per-anatomy crops, or global-only (CLIP baseline)")
    anatomies: list[str] = opt([], "anatomy ids (filled from the data when empty)")
    embed_dim: int = opt(256, "shared embedding size")
    use_global: bool = opt(True, "also train the global (whole volume <-> findings+impressions) embedding")
    proj_hidden: int = opt(0, "hidden width of an MLP projection head (0 = linear)")
    center_image: bool = opt(False, "centre image outputs per anatomy (batch norm without scale)")
    center_momentum: float = opt(0.9, "momentum of the running image mean used at eval")
    temperature_init: float = opt(0.07, "initial softmax temperature")
    temperature_min: float = opt(0.01, "temperature clamp (logit scale at most 1 / this)")
    learn_temperature: bool = opt(True, "learn the temperature")
    logit_bias_init: float | None = opt(None, "learnable logit bias (sigmoid loss, e.g. -10); null = none")
    aux_classes: int = opt(0, "outputs of a per-anatomy linear classification head on the anatomy embeddings "
                           "(one logit per diagnosis label column; 0 = no head). Only the auxiliary loss "
                           "(loss.aux_weight) uses it; zero-shot scoring stays image <-> text. fvlm pretrain "
                           "sets it to the number of label columns when loss.aux_weight > 0")
    image: ImageConfig = opt(ImageConfig(), "image side")
    text: TextConfig = opt(TextConfig(), "text side")


class _Heads(nn.Module):
    """``K`` independent projection heads applied by index: ``(M, D)`` rows + ``(M,)`` head ids -> ``(M, E)``."""

    def __init__(self, k: int, d_in: int, d_out: int, hidden: int = 0):
        super().__init__()
        self.hidden = hidden
        d1 = hidden or d_out
        self.w1 = nn.Parameter(torch.randn(k, d_in, d1) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(k, d1))
        if hidden:
            self.w2 = nn.Parameter(torch.randn(k, hidden, d_out) / math.sqrt(hidden))
            self.b2 = nn.Parameter(torch.zeros(k, d_out))

    def forward(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        y = torch.bmm(x.unsqueeze(1), self.w1[head]).squeeze(1) + self.b1[head]
        if self.hidden:
            y = torch.bmm(F.gelu(y).unsqueeze(1), self.w2[head]).squeeze(1) + self.b2[head]
        return y


class _QueryPool(nn.Module):
    """Learnable queries (one per name and level) attending to masked tokens.

    ``tokens (B, N, C)``, ``mask (B, Q, N)`` bool, ``qid (B, Q)`` query ids -> ``(B, Q, C)``.
    Keys and values are computed once per token and shared by all queries. A query with an
    empty mask attends to all tokens (its output is masked out of the loss anyway).
    """

    def __init__(self, n_queries: int, dim: int, heads: int, kind: str = "query", topk: int = 1):
        super().__init__()
        if dim % heads:
            raise FvlmError(f"model.image.pool_heads ({heads}) must divide the encoder width ({dim})")
        if kind not in ("query", "mean", "topk"):
            raise ConfigError(f"model.image.pool must be query, mean or topk, got {kind!r}")
        if topk < 1:
            raise ConfigError(f"model.image.pool_topk must be at least 1, got {topk}")
        self.kind, self.topk = kind, topk
        self.heads = heads
        if kind == "query":      # mean/topk have no queries: no parameters that never get a gradient
            self.q = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
            self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, qid: torch.Tensor) -> torch.Tensor:
        if self.kind != "query":
            return self._masked_reduce(tokens, mask)
        B, N, C = tokens.shape
        h, d = self.heads, C // self.heads
        t = self.norm(tokens)
        k = self.k(t).view(B, N, h, d)
        v = self.v(t).view(B, N, h, d)
        q = self.q[qid].view(B, -1, h, d)
        logits = torch.einsum("bqhd,bnhd->bqhn", q, k) / math.sqrt(d)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
        attn = logits.softmax(dim=-1)
        return torch.einsum("bqhn,bnhd->bqhd", attn, v).reshape(B, -1, C)

    def _masked_reduce(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean, or per channel the mean of the ``topk`` largest, of the values ``v(norm(tokens))``
        over each row's masked tokens: ``(B, N, C)``, ``(B, Q, N)`` -> ``(B, Q, C)``."""
        v = self.v(self.norm(tokens))                                          # (B, N, C)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        if self.kind == "mean":
            w = mask.to(v.dtype)
            return torch.einsum("bqn,bnc->bqc", w, v) / w.sum(-1, keepdim=True)
        k = min(self.topk, v.shape[1])
        vals = v.unsqueeze(1).masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, Q, N, C)
        top = vals.topk(k, dim=2).values                                       # (B, Q, k, C)
        # a mask with fewer than k tokens: average its tokens only (the -inf rows are not values)
        ok = torch.isfinite(top)
        return torch.where(ok, top, torch.zeros_like(top)).sum(2) / ok.sum(2).clamp_min(1)


class _MaskedCenter(nn.Module):
    """Subtract the per-name mean over valid rows (training) or its running mean (eval)."""

    def __init__(self, k: int, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(k, dim))
        self.register_buffer("initialised", torch.zeros(k, dtype=torch.bool))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x (B, K, E)``, ``valid (B, K)`` -> ``(B, K, E)``."""
        if self.training:
            w = valid.to(x.dtype).unsqueeze(-1)
            cnt = w.sum(0)
            mean = (x * w).sum(0) / cnt.clamp_min(1)
            with torch.no_grad():
                has = cnt.squeeze(-1) > 0
                m = mean.detach().to(self.running_mean.dtype)
                new = torch.where(self.initialised[:, None], self.momentum * self.running_mean +
                                  (1 - self.momentum) * m, m)
                self.running_mean.copy_(torch.where(has[:, None], new, self.running_mean))
                self.initialised |= has
            return x - mean.unsqueeze(0)
        return x - self.running_mean.to(x.dtype).unsqueeze(0)


class FVLM(nn.Module):
    """See the module docstring. ``names`` = anatomies (+ ``"global"`` when used)."""

    def __init__(self, cfg: FVLMConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.mode != "global" and not cfg.anatomies:
            raise FvlmError("model.anatomies is empty: name the anatomies (or let the data fill them in)")
        self.anatomies = list(cfg.anatomies) if cfg.mode != "global" else []
        self.use_global = cfg.use_global or cfg.mode == "global"
        self.names = self.anatomies + ([GLOBAL] if self.use_global else [])
        ic = cfg.image
        self.image_encoder = create_encoder(ic.encoder, img_size=tuple(ic.img_size), patch_size=tuple(ic.patch_size),
                                            in_chans=1, **ic.encoder_args)
        if ic.pretrained:
            load_encoder_weights(self.image_encoder, ic.pretrained)
        self.image_encoder.set_grad_checkpointing(ic.grad_checkpointing)
        self.levels = _check_levels(ic.levels, self.image_encoder.depth, ic.encoder)
        C = self.image_encoder.embed_dim
        L = len(self.levels)
        K = len(self.names)
        self.pool = _QueryPool(K * L, C, ic.pool_heads, ic.pool, ic.pool_topk)
        self.image_proj = _Heads(K, C * L, cfg.embed_dim, cfg.proj_hidden)
        self.image_center = _MaskedCenter(K, cfg.embed_dim, cfg.center_momentum) if cfg.center_image else None
        if cfg.aux_classes < 0:
            raise ConfigError(f"model.aux_classes must be >= 0, got {cfg.aux_classes}")
        # the auxiliary classifier reads the L2-normalised anatomy embedding (what zero-shot compares
        # with text), scaled to unit variance per dimension, so its supervision shapes that space
        self.aux_head = (_Heads(len(self.anatomies), cfg.embed_dim, cfg.aux_classes)
                         if cfg.aux_classes and self.anatomies else None)

        tc = cfg.text
        if tc.encode_group < 1:
            raise ConfigError(f"model.text.encode_group must be at least 1, got {tc.encode_group}")
        if text_encoder is None:
            text_encoder = _make_text_encoder(tc)
        self.text_encoder = text_encoder
        if tc.freeze:
            for p in self.text_encoder.parameters():
                p.requires_grad_(False)
            self.text_encoder.eval()
        D = self.text_encoder.embed_dim
        self.text_proj = _Heads(K if tc.projection == "per_anatomy" else 1, D, cfg.embed_dim, cfg.proj_hidden)
        self.text_center = _MaskedCenter(K, D, tc.center_momentum) if tc.center else None
        self._text_cache: dict[str, torch.Tensor] = {}

        init = math.log(1.0 / cfg.temperature_init)
        # shape (1,), not (): DeepSpeed broadcasts parameters as byte views, impossible for 0-d tensors
        self.logit_scale = nn.Parameter(torch.full((1,), init), requires_grad=cfg.learn_temperature)
        self.logit_bias = (nn.Parameter(torch.full((1,), float(cfg.logit_bias_init)))
                           if cfg.logit_bias_init is not None else None)

    def train(self, mode: bool = True):
        """A frozen text encoder stays in eval mode (no dropout), so its features are a
        deterministic function of the text and can be cached."""
        super().train(mode)
        if self.cfg.text.freeze:
            self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def text_identity(self) -> dict:
        return dict(getattr(self.text_encoder, "identity", {}) or {})

    def _dtype(self) -> torch.dtype:
        return self.image_encoder.patch_embed.proj.weight.dtype

    def _device(self) -> torch.device:
        return self.image_encoder.patch_embed.proj.weight.device

    def get_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=math.log(1.0 / self.cfg.temperature_min)).exp().squeeze(0)

    def _token_masks(self, label_map: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``label_map (B, X, Y, Z)`` -> ``(B, A, N)`` bool: token overlaps anatomy ``a`` (> threshold)."""
        B = label_map.shape[0]
        patch = [s // g for s, g in zip(label_map.shape[1:], grid)]
        out = []
        for a in range(len(self.anatomies)):
            m = (label_map == a + 1).float().unsqueeze(1)
            frac = F.avg_pool3d(m, kernel_size=patch, stride=patch)
            out.append(frac.reshape(B, -1) > self.cfg.image.mask_threshold)
        return torch.stack(out, dim=1)

    def _encode_levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        dt = self._dtype()
        # DeepSpeed's bf16/fp16 casts parameters but not buffers (the encoder's sin-cos position
        # table), and a float32 buffer would silently promote the tokens back to float32
        for buf in self.image_encoder.buffers():
            if buf.is_floating_point() and buf.dtype != dt:
                buf.data = buf.data.to(dt)
        maps = self.image_encoder.forward_intermediates(x.to(dt), indices=self.levels)
        grid = tuple(maps[0].shape[2:])
        return [m.flatten(2).transpose(1, 2) for m in maps], grid  # L x (B, N, C)

    def _pool(self, levels: list[torch.Tensor], masks: torch.Tensor, name_idx: torch.Tensor) -> torch.Tensor:
        """``levels`` L x (B, N, C), ``masks (B, Q, N)``, ``name_idx (B, Q)`` -> projected ``(B, Q, E)``."""
        L = len(self.levels)
        pooled = torch.cat([self.pool(t, masks, name_idx * L + li) for li, t in enumerate(levels)], dim=-1)
        B, Q, _ = pooled.shape
        return self.image_proj(pooled.reshape(B * Q, -1), name_idx.reshape(-1)).view(B, Q, -1)

    def _global_from(self, levels: list[torch.Tensor]) -> torch.Tensor:
        B, N = levels[0].shape[:2]
        dev = levels[0].device
        gi = torch.full((B, 1), self.names.index(GLOBAL), dtype=torch.long, device=dev)
        if self.cfg.image.global_pool == "mean":
            feats = torch.cat([t.mean(dim=1) for t in levels], dim=-1)
            return self.image_proj(feats, gi[:, 0])
        return self._pool(levels, torch.ones(B, 1, N, dtype=torch.bool, device=dev), gi)[:, 0]

    # ------------------------------------------------------------------ image
    def image_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised image outputs ``(B, K, E)`` for every name and validity ``(B, K)``."""
        K = len(self.names)
        A = len(self.anatomies)
        ref = batch["volume"] if "volume" in batch else batch["crops"]
        B = ref.shape[0]
        dev = ref.device
        out = torch.zeros(B, K, self.cfg.embed_dim, device=dev, dtype=torch.float32)
        valid = torch.zeros(B, K, dtype=torch.bool, device=dev)
        vol_levels = None
        if self.cfg.mode == "volume" or (self.use_global and "volume" in batch):
            if "volume" not in batch:
                raise FvlmError("this model needs whole volumes (batch['volume']); set data.load_volume: true")
            vol_levels, grid = self._encode_levels(batch["volume"])
        if A and self.cfg.mode == "volume":
            masks = self._token_masks(batch["label_map"].to(dev), grid)          # (B, A, N)
            present = batch["present"].to(dev) & masks.any(-1)
            idx = torch.arange(A, device=dev).expand(B, A)
            out[:, :A] = self._pool(vol_levels, masks, idx).float()
            valid[:, :A] = present
        elif A and self.cfg.mode == "crop":
            if "crops" not in batch:
                raise FvlmError("crop mode needs batch['crops']; set data.load_crops: true")
            present = batch["present"].to(dev)
            bi, ai = present.nonzero(as_tuple=True)
            if len(bi):
                crops = batch["crops"][bi, ai]                                    # (M, 1, x, y, z)
                levels, grid = self._encode_levels(crops)
                cm = batch["crop_masks"][bi, ai].unsqueeze(1).float()
                patch = [s // g for s, g in zip(cm.shape[2:], grid)]
                m = F.avg_pool3d(cm, patch, patch).flatten(1) > self.cfg.image.mask_threshold
                emb = self._pool(levels, m[:, None, :], ai[:, None])[:, 0]
                out[bi, ai] = emb.float()
            valid[:, :A] = present
        if self.use_global:
            if vol_levels is None:
                raise FvlmError("the global embedding needs whole volumes; set data.load_volume: true")
            gi = self.names.index(GLOBAL)
            out[:, gi] = self._global_from(vol_levels).float()
            valid[:, gi] = True
        if self.image_center is not None:
            out = self.image_center(out, valid)
        return out, valid

    def encode_image(self, batch: dict) -> dict[str, torch.Tensor]:
        """L2-normalised image embeddings ``{name: (B, E)}`` (anatomies and ``"global"``).

        Absent anatomies get a vector too (pooled over all tokens); mask them with
        ``batch["present"]``.
        """
        feats, _ = self.image_features(batch)
        feats = F.normalize(feats, dim=-1)
        return {n: feats[:, k] for k, n in enumerate(self.names)}

    # ------------------------------------------------------------------ text
    def _raw_text(self, texts: list[str]) -> torch.Tensor:
        """Text-encoder features ``(N, D)`` (float32).

        A frozen encoder's features are a function of the text alone (cache on, cache off and
        any batch give the same bits, see :meth:`_frozen_text`), cached per distinct string. A
        trained encoder runs on the batch as given, with gradients.
        """
        tc = self.cfg.text
        dev = self._device()
        empty = torch.zeros(0, self.text_encoder.embed_dim, device=dev)
        if not tc.freeze:
            # no cache: cached features of a trained encoder would go stale after the next step
            return self._text_forward(texts).float() if texts else empty
        # the frozen paths run _frozen_text even with nothing to encode: ZeRO-3 ranks stay in step
        if not tc.cache:
            uniq = list(dict.fromkeys(texts))
            f = dict(zip(uniq, self._frozen_text(uniq)))
            return torch.stack([f[t] for t in texts]) if texts else empty
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        f = self._frozen_text(missing).cpu()
        if missing:
            if len(self._text_cache) + len(missing) > tc.cache_size:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, f))
        return torch.stack([self._text_cache[t] for t in texts]).to(dev) if texts else empty

    def _frozen_text(self, texts: list[str]) -> torch.Tensor:
        """Frozen-encoder features ``(N, D)`` float32 that depend on each text only.

        Texts are encoded in groups of exactly ``text.encode_group``, each padded to
        ``text.max_tokens`` tokens (short groups filled with empty texts), so every forward has
        the same shapes whatever the batch held and whatever was cached. With the text encoder
        partitioned over ranks (ZeRO-3) every forward is a collective, so all ranks run as many
        groups as the rank that needs most (:func:`text_groups_in_step`).
        """
        G = self.cfg.text.encode_group
        D = self.text_encoder.embed_dim
        dev = self._device()
        n = text_groups_in_step(len(texts), G, sync=_is_partitioned(self.text_encoder), device=dev)
        outs = []
        with torch.no_grad():
            for g in range(n):
                chunk = texts[g * G:(g + 1) * G]
                f = self._text_forward(chunk + [""] * (G - len(chunk)), fixed_length=True)
                outs.append(f[:len(chunk)].float())
        return torch.cat(outs) if outs else torch.zeros(0, D, device=dev)

    def _text_forward(self, texts: list[str], fixed_length: bool = False) -> torch.Tensor:
        if fixed_length:
            tok = self.text_encoder.tokenizer(list(texts), padding="max_length", truncation=True,
                                              max_length=self.text_encoder.max_tokens, return_tensors="pt")
        else:
            tok = self.text_encoder.tokenize(texts)
        tok = {k: v.to(self._device()) for k, v in dict(tok).items()}
        return self.text_encoder(**tok)

    def _project_text(self, raw: torch.Tensor, name_idx: torch.Tensor) -> torch.Tensor:
        if self.text_center is not None:
            raw = raw - self.text_center.running_mean[name_idx].to(raw.dtype)
        head = name_idx if self.cfg.text.projection == "per_anatomy" else torch.zeros_like(name_idx)
        w_dtype = self.text_proj.w1.dtype
        return self.text_proj(raw.to(w_dtype), head).float()

    def encode_text(self, texts: Sequence[str], anatomy: str | None = None) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, E)`` in ``anatomy``'s space (None = global)."""
        name = GLOBAL if anatomy is None else anatomy
        if name not in self.names:
            if anatomy is None:
                raise FvlmError("this model has no global embedding (trained with use_global: false)")
            raise FvlmError(f"unknown anatomy {anatomy!r}; the model knows {', '.join(self.anatomies)}")
        raw = self._raw_text(list(texts))
        idx = torch.full((raw.shape[0],), self.names.index(name), dtype=torch.long, device=raw.device)
        return F.normalize(self._project_text(raw, idx), dim=-1)

    def text_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, K, E)`` projected text, ``(B, K)`` validity, ``(B, K, D)`` raw features (detached)."""
        B = len(batch["texts"]) if "texts" in batch else len(batch["global_text"])
        K = len(self.names)
        dev = self._device()
        strings, where = [], []
        has = torch.zeros(B, K, dtype=torch.bool)
        for b in range(B):
            for k, n in enumerate(self.anatomies):
                t = batch["texts"][b][k]
                if t:
                    strings.append(t)
                    where.append((b, k))
                    has[b, k] = True
            if self.use_global:
                t = batch["global_text"][b]
                if t:
                    k = self.names.index(GLOBAL)
                    strings.append(t)
                    where.append((b, k))
                    has[b, k] = True
        D = self.text_encoder.embed_dim
        raw = torch.zeros(B, K, D, device=dev)
        if strings or self.cfg.text.freeze:   # a frozen encoder takes part even with no text (ZeRO-3)
            f = self._raw_text(strings)
        if strings:
            bi = torch.tensor([w[0] for w in where], device=dev)
            ki = torch.tensor([w[1] for w in where], device=dev)
            raw = raw.index_put((bi, ki), f)
        has = has.to(dev)
        if self.text_center is not None and self.training:
            self.text_center(raw.detach(), has)     # updates the running mean only
        idx = torch.arange(K, device=dev).repeat(B)
        proj = self._project_text(raw.reshape(B * K, D), idx).view(B, K, -1)
        return proj, has, raw.detach()

    # ------------------------------------------------------------------ forward (for the loss)
    def forward(self, batch: dict) -> dict:
        """Everything the contrastive loss needs (see ``FineGrainedContrastiveLoss.forward``)."""
        img, ivalid = self.image_features(batch)
        txt, tvalid, raw = self.text_features(batch)
        img = F.normalize(img, dim=-1)
        txt = F.normalize(txt, dim=-1)
        out = {"image": {}, "text": {}, "valid": {}, "text_ref": {}, "logit_scale": self.get_logit_scale()}
        A = len(self.anatomies)
        if self.aux_head is not None:
            out["aux"] = {"logits": self.aux_logits(img[:, :A]), "valid": ivalid[:, :A].clone()}
        if A and "has_text" in batch:
            tvalid[:, :A] &= batch["has_text"].to(tvalid.device)
        valid = ivalid & tvalid
        # the loss gathers these stacks once per step; the per-name views (no copies) serve
        # validation and the API
        out["stacked"] = {"names": list(self.names), "image": img, "text": txt, "valid": valid, "text_ref": raw}
        for k, n in enumerate(self.names):
            out["image"][n] = img[:, k]
            out["text"][n] = txt[:, k]
            out["valid"][n] = valid[:, k]
            out["text_ref"][n] = raw[:, k]
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.float().squeeze(0)
        return out

    def aux_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Classification logits ``(B, A, aux_classes)`` from L2-normalised anatomy embeddings ``(B, A, E)``."""
        B, A, E = emb.shape
        head = torch.arange(A, device=emb.device).repeat(B)
        x = emb.reshape(B * A, E).to(self.aux_head.w1.dtype) * math.sqrt(E)
        return self.aux_head(x, head).view(B, A, -1).float()

    def no_weight_decay(self) -> set[str]:
        """Full parameter names that must get no weight decay.

        The encoders' own sets (position/class tokens, norms, biases) under their prefixes, plus
        this model's: the anatomy queries, norms, head biases, temperature and logit bias.
        """
        out = set()
        for prefix, mod in (("image_encoder.", self.image_encoder), ("text_encoder.", self.text_encoder)):
            nwd = getattr(mod, "no_weight_decay", None)
            names = nwd() if nwd is not None else {n for n, p in mod.named_parameters() if p.ndim <= 1}
            out |= {prefix + n for n in names}
        own = ("pool.q", "logit_scale", "logit_bias")
        for n, p in self.named_parameters():
            if n.startswith(("image_encoder.", "text_encoder.")):
                continue
            leaf = n.rsplit(".", 1)[-1]
            if n in own or p.ndim <= 1 or leaf in ("b1", "b2"):   # _Heads biases are (K, E)
                out.add(n)
        return out

    def param_groups_hint(self) -> dict[str, str]:
        """Parameter-name prefixes per group, for per-group learning rates."""
        return {"image_encoder.": "encoder", "text_encoder.": "text"}


def _is_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned ``module``'s parameters (each forward gathers them)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def text_groups_in_step(n_texts: int, group: int, sync: bool, device=None) -> int:
    """How many text-encoder forwards of ``group`` texts this rank runs for ``n_texts`` new texts.

    ``sync``: the forwards are collectives (ZeRO-3), so every rank runs the maximum over ranks
    (one all_reduce; ranks with fewer texts encode padding). Without a process group it is local.
    """
    n = -(-n_texts // group)
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t.item())
    return n


def _check_levels(levels: Sequence[int], depth: int, encoder: str) -> list[int]:
    """Sorted block indices for ``levels`` (negative = from the end); out of range is a ConfigError.

    Wrapping an index modulo the depth once turned ViT-B's [2, 5, 8, 11] into [0, 1, 2, 3] of a
    4-block encoder without a word.
    """
    levels = list(levels)
    if not levels:
        raise ConfigError("model.image.levels is empty: name at least one encoder block (e.g. [-1])")
    bad = [i for i in levels if not -depth <= int(i) < depth]
    if bad:
        raise ConfigError(f"model.image.levels {levels}: block(s) {bad} do not exist in encoder {encoder} "
                          f"of depth {depth} (valid: 0..{depth - 1}, or -{depth}..-1 from the end)")
    return sorted({int(i) % depth for i in levels})


def _make_text_encoder(tc: TextConfig) -> nn.Module:
    from ..encoders.text import TextEncoder  # transformers: loaded when a model is built

    if tc.model_dir == "tiny-random":
        return TextEncoder.tiny_random(max_tokens=tc.max_tokens)
    return TextEncoder(model_dir=tc.model_dir, max_tokens=tc.max_tokens, pooling=tc.pooling)
