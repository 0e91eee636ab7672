"""Prompt sets per diagnosis, encoded once, and the rules turning similarities into scores.

A diagnosis is scored on one image embedding (its anatomy's, or ``"global"`` for
whole-scan diagnoses and for the CLIP baseline) against its positive and negative
phrasings. Every distinct ``(text, anatomy)`` pair goes through the text encoder
exactly once per evaluation, however many diagnoses share it.

Scoring rules (``scoring.rule``), with ``s`` cosine similarities and ``t`` the logit scale:

- ``pairwise`` (default): mean over all (positive p, negative n) pairs of
  ``softmax([t s_p, t s_n])[0] = sigmoid(t (s_p - s_n))``: CT-CLIP's two-prompt
  softmax, averaged over the prompt ensemble.
- ``mean_embedding``: the positive prompt embeddings are averaged and
  re-normalised (likewise the negatives), then the two-prompt softmax.
- ``softmax_all``: one softmax over all positive and negative prompts; the score is
  the probability mass on the positives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import FvlmError
from ..taxonomy import GLOBAL, Taxonomy
from ..engine.zero import gathered


@dataclass
class PromptSet:
    """The phrasings of one diagnosis and the embedding it is scored on."""
    diagnosis: str                 # diagnosis id
    name: str
    anatomy: str                   # the taxonomy's anatomy id, or "global"
    embedding: str                 # key of the image embedding used ("global" for the CLIP baseline)
    positives: list[str]
    negatives: list[str]
    text_anatomy: str | None = None  # anatomy passed to encode_text (None = global text projection)


def ctclip_prompts(label: str) -> tuple[list[str], list[str]]:
    """CT-CLIP's zero-shot wording for a CT-RATE label name (its CSV column, verbatim)."""
    return [f"{label} is present."], [f"{label} is not present."]


def build_prompt_sets(taxonomy, style: str = "taxonomy", clip_baseline: bool = False) -> list[PromptSet]:
    """One :class:`PromptSet` per taxonomy diagnosis.

    ``style="ctclip"`` replaces the phrasings of diagnoses that carry a ``ctrate`` name
    by CT-CLIP's wording; others keep the taxonomy's and are flagged by the caller.
    """
    sets = []
    for d in Taxonomy.of(taxonomy).diagnoses:
        did, anatomy = d.id, d.anatomy
        pos, neg = list(d.prompts_positive), list(d.prompts_negative)
        if style == "ctclip":
            if d.ctrate:
                pos, neg = ctclip_prompts(d.ctrate)
        elif style != "taxonomy":
            raise FvlmError(f"unknown prompt style {style!r} (taxonomy, ctclip)")
        if not pos or not neg:
            raise FvlmError(f"diagnosis '{did}' of the taxonomy has no positive or no negative prompts; "
                            "zero-shot scoring needs both (add prompts_positive/prompts_negative)")
        emb = GLOBAL if clip_baseline else anatomy
        sets.append(PromptSet(did, d.name, anatomy, emb, pos, neg,
                              None if emb == GLOBAL else emb))
    return sets


@dataclass
class PromptEmbeddings:
    """Encoded prompts: per diagnosis ``(P, E)`` positives and ``(Q, E)`` negatives."""
    positives: dict[str, np.ndarray] = field(default_factory=dict)
    negatives: dict[str, np.ndarray] = field(default_factory=dict)
    n_texts: int = 0     # distinct (text, anatomy) pairs sent to the text encoder
    n_calls: int = 0     # encode_text calls


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def encode_texts(model, texts: Sequence[str], anatomy: str | None, chunk: int = 64) -> tuple[np.ndarray, int]:
    """Encode texts with ``model.encode_text`` in chunks; returns ``(N, E)`` and the call count."""
    out, calls = [], 0
    for i in range(0, len(texts), chunk):
        out.append(_to_numpy(model.encode_text(list(texts[i:i + chunk]), anatomy=anatomy)))
        calls += 1
    if not out:
        return np.zeros((0, 0), np.float32), 0
    return np.concatenate(out, 0), calls


def encode_prompt_sets(model, sets: Sequence[PromptSet]) -> PromptEmbeddings:
    """Encode every distinct (text, text_anatomy) pair of ``sets`` once."""
    by_anat: dict[str | None, list[str]] = {}
    for ps in sets:
        lst = by_anat.setdefault(ps.text_anatomy, [])
        for t in ps.positives + ps.negatives:
            if t not in lst:
                lst.append(t)
    table: dict[tuple[str | None, str], np.ndarray] = {}
    pe = PromptEmbeddings()
    for anat, texts in by_anat.items():
        emb, calls = encode_texts(model, texts, anat)
        pe.n_calls += calls
        pe.n_texts += len(texts)
        for t, e in zip(texts, emb):
            table[(anat, t)] = e
    for ps in sets:
        pe.positives[ps.diagnosis] = np.stack([table[(ps.text_anatomy, t)] for t in ps.positives])
        pe.negatives[ps.diagnosis] = np.stack([table[(ps.text_anatomy, t)] for t in ps.negatives])
    return pe


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def score(image: np.ndarray, pos: np.ndarray, neg: np.ndarray, rule: str = "pairwise",
          logit_scale: float = 100.0) -> np.ndarray:
    """Probability-like score in [0, 1] per case.

    Args:
        image: ``(N, E)`` L2-normalised image embeddings.
        pos, neg: ``(P, E)`` and ``(Q, E)`` L2-normalised prompt embeddings.
        rule: ``pairwise``, ``mean_embedding`` or ``softmax_all`` (module docstring).
        logit_scale: similarity multiplier (CLIP's learned temperature inverse).
    Returns ``(N,)`` float64.
    """
    image = np.asarray(image, np.float64)
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    if rule == "pairwise":
        sp = image @ pos.T                               # (N, P)
        sn = image @ neg.T                               # (N, Q)
        diff = sp[:, :, None] - sn[:, None, :]           # (N, P, Q)
        return _sigmoid(logit_scale * diff).mean(axis=(1, 2))
    if rule == "mean_embedding":
        p = _normalize(pos.mean(0))
        n = _normalize(neg.mean(0))
        return _sigmoid(logit_scale * (image @ p - image @ n))
    if rule == "softmax_all":
        logits = logit_scale * (image @ np.concatenate([pos, neg]).T)   # (N, P+Q)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e[:, :pos.shape[0]].sum(1) / e.sum(1)
    raise FvlmError(f"unknown scoring rule {rule!r} (pairwise, mean_embedding, softmax_all)")


def score_prompt_sets(arrays: dict[str, np.ndarray], sets: Sequence[PromptSet], pe: PromptEmbeddings,
                      rule: str = "pairwise", logit_scale: float = 100.0,
                      rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Zero-shot scores per diagnosis: ``{diagnosis id: (N,)}`` by :func:`score`.

    The one scoring path of ``fvlm zeroshot`` and of validation during pretraining (which picks
    ``best.pt``), so both rank a model by the same rule and prompts.

    Args:
        arrays: image embeddings by key (``"global"`` or anatomy) ``(N_all, E)``, L2-normalised.
        sets, pe: prompt sets and their encodings (:func:`encode_prompt_sets`); a set whose
            embedding key is not in ``arrays`` is left out of the result.
        rows: ``(N,)`` row indices into ``arrays`` (None = all rows).
    """
    out = {}
    for ps in sets:
        if ps.embedding not in arrays or ps.diagnosis not in pe.positives:
            continue
        img = arrays[ps.embedding] if rows is None else arrays[ps.embedding][rows]
        out[ps.diagnosis] = score(img, pe.positives[ps.diagnosis], pe.negatives[ps.diagnosis], rule, logit_scale)
    return out


def model_logit_scale(model, default: float = 100.0) -> float:
    """The model's learned similarity scale, else ``default``.

    Uses ``model.get_logit_scale()`` when the model has it (fvlm's FVLM: exp of the
    learned log-scale, clamped); else a tensor ``model.logit_scale`` is read with CLIP's
    convention (it stores the log; clamped at 100) and a plain number as the scale itself.
    """
    ls = getattr(model, "logit_scale", None)
    # under ZeRO-3 the scale is partitioned: gathered for the read (every rank calls this, as validation does)
    with gathered([ls] if ls is not None else []):
        return _read_logit_scale(model, default)


def _read_logit_scale(model, default: float) -> float:
    getter = getattr(model, "get_logit_scale", None)
    if callable(getter):
        v = getter()
        return float(v.detach().float().cpu().reshape(-1)[0]) if hasattr(v, "detach") else float(v)
    ls = getattr(model, "logit_scale", None)
    if ls is None:
        return default
    if hasattr(ls, "detach"):
        v = float(ls.detach().float().cpu().reshape(-1)[0])
        return float(min(np.exp(v), 100.0))
    try:
        return float(ls)
    except (TypeError, ValueError):
        return default
