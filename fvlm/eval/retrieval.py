"""Image <-> text retrieval on the test cases: whole reports and per-anatomy descriptions.

Gallery and queries are the test cases that have the text; a query's correct items
are every gallery entry with the *same* text (template reports such as "no acute
findings" are shared by many scans, and retrieving any of them is correct). Ties in
similarity count against the query (``fvlm.eval.metrics.retrieval_ranks``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .metrics import recall_at_k
from .prompts import encode_texts


def _same_text(texts: Sequence[str]) -> np.ndarray:
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    code = np.asarray([ids[t] for t in texts])
    return code[:, None] == code[None, :]


def retrieval_block(image: np.ndarray, text: np.ndarray, texts: Sequence[str], ks: Sequence[int]) -> dict:
    """Recall@k both ways for aligned ``(N, E)`` image and text embeddings."""
    pos = _same_text(texts)
    sim = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T
    return {"n": int(len(texts)), "distinct_texts": int(len(set(texts))),
            "image_to_text": {k: round(v, 6) for k, v in recall_at_k(sim, ks, pos).items()},
            "text_to_image": {k: round(v, 6) for k, v in recall_at_k(sim.T, ks, pos.T).items()}}


def report_text(record, fields: Sequence[str]) -> str:
    rep = getattr(record, "report", None) or {}
    return " ".join(str(rep.get(f) or "").strip() for f in fields if rep.get(f)).strip()


def anatomy_text(record, anatomy: str) -> str:
    at = (getattr(record, "anatomy_text", None) or {}).get(anatomy) or {}
    sents = at.get("sentences") if isinstance(at, dict) else getattr(at, "sentences", None)
    return " ".join(sents or []).strip()


def run_retrieval(model, records: Sequence, arrays: dict[str, np.ndarray], present: dict[str, np.ndarray],
                  ks: Sequence[int], report_fields: Sequence[str]) -> tuple[dict, int]:
    """Retrieval results on the rows of ``arrays`` (aligned with ``records``) and text-encoder calls made."""
    out: dict = {}
    calls = 0
    texts = [report_text(r, report_fields) for r in records]
    rows = [i for i, t in enumerate(texts) if t]
    if "global" in arrays and len(rows) >= 2:
        emb, c = encode_texts(model, [texts[i] for i in rows], None)
        calls += c
        out["report"] = retrieval_block(arrays["global"][rows], emb, [texts[i] for i in rows], ks)
    for a, arr in arrays.items():
        if a == "global":
            continue
        texts = [anatomy_text(r, a) for r in records]
        pres = present.get(a, np.ones(len(records), bool))
        rows = [i for i, t in enumerate(texts) if t and pres[i]]
        if len(rows) < 2:
            continue
        emb, c = encode_texts(model, [texts[i] for i in rows], a)
        calls += c
        out[a] = retrieval_block(arr[rows], emb, [texts[i] for i in rows], ks)
    return out, calls
