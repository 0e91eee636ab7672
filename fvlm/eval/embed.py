"""Encode each case once and cache the embeddings on disk.

One call of ``model.encode_image(batch)`` returns the global embedding and every
anatomy embedding of the cases in ``batch``; the suite never encodes a case twice,
and a re-run with the same checkpoint and data reads the cache instead.

Cache file: ``<cache_dir>/emb-<checkpoint sha[:16]>-<data hash[:16]>.npz`` holding
``case_ids`` (str array), one ``(N, E)`` float32 array per embedding key (named
``emb__<key>``) and ``present__<anatomy>`` (bool, whether the anatomy is in the scan).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..hashing import file_sha256  # noqa: F401 - also imported from here
from ..logs import get_logger
from ..progress import progress

log = get_logger("eval")


def data_fingerprint(root: str | os.PathLike, small: int = 1 << 20) -> str:
    """Hex SHA-256 identifying a shard root without reading every volume.

    Hashes the sorted relative path and size of every file, plus the full bytes of
    files up to ``small`` bytes (indexes, manifests, JSON) and the first and last
    ``small`` bytes of larger ones (h5 headers and trailing chunks). Any re-run of
    ``fvlm preprocess`` that changes a shard changes its size or these bytes in practice.
    """
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and "cache" not in p.relative_to(root).parts)
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= small:
                h.update(f.read())
            else:
                h.update(f.read(small))
                f.seek(size - small)
                h.update(f.read(small))
    return h.hexdigest()


@dataclass
class CaseEmbeddings:
    """Image embeddings of a set of cases, rows aligned with ``case_ids``."""
    case_ids: list[str]
    arrays: dict[str, np.ndarray]                        # key ("global" or anatomy) -> (N, E)
    present: dict[str, np.ndarray] = field(default_factory=dict)  # anatomy -> (N,) bool
    n_forwards: int = 0                                  # encode_image calls made for these rows
    n_cached: int = 0                                    # rows read from the cache

    def rows(self, case_ids: Sequence[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.case_ids)}
        return np.asarray([index[c] for c in case_ids], dtype=np.int64)

    def subset(self, case_ids: Sequence[str]) -> "CaseEmbeddings":
        r = self.rows(case_ids)
        return CaseEmbeddings(list(case_ids), {k: v[r] for k, v in self.arrays.items()},
                              {k: v[r] for k, v in self.present.items()})

    @property
    def keys(self) -> list[str]:
        return list(self.arrays)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class EmbeddingCache:
    """Case embeddings of one (checkpoint, data) pair in one ``.npz`` file."""

    def __init__(self, cache_dir: str | os.PathLike, checkpoint_hash: str, data_hash: str):
        self.path = Path(cache_dir) / f"emb-{checkpoint_hash[:16]}-{data_hash[:16]}.npz"

    def load(self) -> CaseEmbeddings | None:
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                ids = [str(c) for c in z["case_ids"]]
                arrays = {k[5:]: z[k] for k in z.files if k.startswith("emb__")}
                present = {k[9:]: z[k] for k in z.files if k.startswith("present__")}
        except (OSError, ValueError, KeyError) as e:  # a torn or foreign file: ignore, rebuild
            log.warning("ignoring unreadable embedding cache %s (%s)", self.path, e)
            return None
        return CaseEmbeddings(ids, arrays, present)

    def save(self, emb: CaseEmbeddings) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        payload = {"case_ids": np.asarray(emb.case_ids, dtype=str)}
        payload.update({f"emb__{k}": v.astype(np.float32) for k, v in emb.arrays.items()})
        payload.update({f"present__{k}": v.astype(bool) for k, v in emb.present.items()})
        np.savez(tmp, **payload)
        os.replace(tmp, self.path)


def _merge(a: CaseEmbeddings, b: CaseEmbeddings) -> CaseEmbeddings:
    keys = [k for k in a.arrays if k in b.arrays]
    pres = [k for k in a.present if k in b.present]
    return CaseEmbeddings(a.case_ids + b.case_ids,
                          {k: np.concatenate([a.arrays[k], b.arrays[k]]) for k in keys},
                          {k: np.concatenate([a.present[k], b.present[k]]) for k in pres})


def encode_cases(model, dataset, case_ids: Sequence[str], make_batch: Callable, batch_size: int = 1,
                 cache: EmbeddingCache | None = None, desc: str = "encode cases",
                 get_kwargs: dict | None = None) -> CaseEmbeddings:
    """Image embeddings of ``case_ids``: one ``model.encode_image`` call per batch of cases.

    Args:
        model: has ``encode_image(batch) -> {"global": (B, E), anatomy: (B, E), ...}``.
        dataset: has ``get(case_id, ...) -> CaseRecord`` (``fvlm.data.shards.ShardDataset``).
        make_batch: ``list[CaseRecord] -> batch`` in the model's input format; when it has
            ``load(dataset, case_ids)`` (``fvlm.data.ct.make_batch_fn``) that reads the cases instead.
        cache: cases found there are not encoded again; new ones are added to it.
        get_kwargs: passed to ``dataset.get`` (e.g. ``crops=False`` when the model reads volumes only).
    Rows come back in the order of ``case_ids``.
    """
    case_ids = list(case_ids)
    cached = cache.load() if cache is not None else None
    have = set(cached.case_ids) if cached is not None else set()
    todo = [c for c in case_ids if c not in have]
    fresh = None
    n_forwards = 0
    if todo:
        rows: dict[str, list[np.ndarray]] = {}
        present: dict[str, list[np.ndarray]] = {}
        bar = progress(total=len(todo), desc=desc, unit="case")
        for i in range(0, len(todo), batch_size):
            ids = todo[i:i + batch_size]
            load = getattr(make_batch, "load", None)
            if load is not None:   # the training sample path (fvlm.data.ct.make_batch_fn)
                batch = load(dataset, ids)
                flags = batch["present"].cpu().numpy()
                pres = [{a: bool(flags[j, k]) for k, a in enumerate(make_batch.opts.anatomies)}
                        for j in range(len(ids))]
            else:
                records = [dataset.get(c, **(get_kwargs or {})) for c in ids]
                batch = make_batch(records)
                pres = [dict(getattr(r, "present", None) or {}) for r in records]
            out = model.encode_image(batch)
            n_forwards += 1
            for k, v in out.items():
                rows.setdefault(str(k), []).append(_to_numpy(v))
            anat_keys = [k for k in out if k != "global"]
            for k in anat_keys:
                present.setdefault(str(k), []).append(np.asarray([bool(p.get(k, True)) for p in pres]))
            bar.update(len(ids))
        bar.close()
        fresh = CaseEmbeddings(todo, {k: np.concatenate(v) for k, v in rows.items()},
                               {k: np.concatenate(v) for k, v in present.items()})
        if cached is not None and set(cached.arrays) != set(fresh.arrays):
            log.warning("embedding cache %s has other keys than the model; rebuilding it", cache.path)
            cache.path.unlink()
            again = encode_cases(model, dataset, case_ids, make_batch, batch_size, cache, desc, get_kwargs)
            again.n_forwards += n_forwards
            return again
        merged = fresh if cached is None else _merge(cached, fresh)
        if cache is not None:
            cache.save(merged)
        cached = merged
    result = cached.subset(case_ids)
    result.n_forwards = n_forwards
    result.n_cached = len(case_ids) - len(todo)
    return result


def describe_cache(emb: CaseEmbeddings, cache: EmbeddingCache | None) -> dict:
    return {"path": str(cache.path) if cache else None, "rows_from_cache": emb.n_cached,
            "image_forwards": emb.n_forwards}
