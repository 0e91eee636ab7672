"""A synthetic embedding model, dataset and taxonomy with planted signal.

Used by the tests and the benchmark to exercise the suite with known answers and
countable encoder calls, independent of trained checkpoints:

- each case carries a latent vector of finding strengths (``volume``), high for the
  diagnoses it is labeled positive for;
- ``SyntheticModel.encode_image`` maps it to per-anatomy embeddings in which a
  diagnosis' direction grows with its finding strength, and records every call;
- ``encode_text`` maps each positive prompt to ``base + u_j`` and each negative to
  ``base - u_j``, so the zero-shot score ranks positives above negatives (AUC > 0.5,
  by a margin set by ``signal``).
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..taxonomy import ABNORMAL, NORMAL, Diagnosis
from .prompts import ctclip_prompts


@dataclass
class SyntheticTaxonomy:
    name: str
    anatomies: list[str]
    diagnoses: list[Diagnosis]


def make_taxonomy(anatomies=("lung", "heart"), per_anatomy: int = 2, global_diagnoses: int = 1,
                  n_prompts: int = 2) -> SyntheticTaxonomy:
    diags = []
    for a in anatomies:
        for k in range(per_anatomy):
            did = f"{a}_finding{k}"
            diags.append(Diagnosis(
                did, f"{a.title()} finding {k}", a,
                prompts_positive=tuple(f"{a} finding {k} variant {p}" for p in range(n_prompts)),
                prompts_negative=tuple(f"no {a} finding {k} variant {p}" for p in range(n_prompts)),
                ctrate=f"{a.title()} finding {k}"))
    for k in range(global_diagnoses):
        did = f"scan_finding{k}"
        diags.append(Diagnosis(did, f"Scan finding {k}", "global",
                               prompts_positive=tuple(f"scan finding {k} variant {p}" for p in range(n_prompts)),
                               prompts_negative=tuple(f"no scan finding {k} variant {p}" for p in range(n_prompts))))
    return SyntheticTaxonomy("synthetic", list(anatomies), diags)


@dataclass
class SyntheticRecord:
    """The fields of ``fvlm.data.shards.CaseRecord`` the suite reads."""
    case_id: str
    patient_id: str
    split: str
    volume: np.ndarray | None
    present: dict
    labels: dict
    report: dict
    anatomy_text: dict
    spacing_mm: tuple = (1.0, 1.0, 1.0)
    meta: dict = field(default_factory=dict)


class SyntheticDataset:
    """Cases with planted findings; splits train/val/test, some patients with several scans."""

    def __init__(self, taxonomy: SyntheticTaxonomy, n_patients: dict | None = None, prevalence: float = 0.3,
                 scans_per_patient=(1, 2), seed: int = 0, absent_rate: float = 0.0, unlabeled_rate: float = 0.05):
        n_patients = n_patients or {"train": 60, "val": 30, "test": 40}
        rng = np.random.default_rng(seed)
        self.taxonomy = taxonomy
        self.anatomies = list(taxonomy.anatomies)
        self._cases: dict[str, SyntheticRecord] = {}
        self.get_calls: Counter = Counter()
        for split, n in n_patients.items():
            for p in range(n):
                pid = f"{split}_p{p}"
                for s in range(int(rng.integers(scans_per_patient[0], scans_per_patient[1] + 1))):
                    cid = f"{pid}_s{s}"
                    y = (rng.random(len(taxonomy.diagnoses)) < prevalence).astype(int)
                    labels = {d.id: int(v) for d, v in zip(taxonomy.diagnoses, y)}
                    for d in taxonomy.diagnoses:
                        if rng.random() < unlabeled_rate:
                            labels[d.id] = -1
                    present = {a: bool(rng.random() >= absent_rate) for a in self.anatomies}
                    pos = [d for d, v in zip(taxonomy.diagnoses, y) if v]
                    report = {"findings": " ".join(f"{d.name}." for d in pos) or "No abnormality.",
                              "impressions": ""}
                    at = {a: {"status": ABNORMAL if any(d.anatomy == a for d in pos) else NORMAL,
                              "sentences": [f"{d.name}." for d in pos if d.anatomy == a] or [f"Normal {a}."]}
                          for a in self.anatomies}
                    self._cases[cid] = SyntheticRecord(cid, pid, split, y.astype(np.float32), present, labels,
                                                       report, at)

    def case_ids(self, split: str | None = None) -> list[str]:
        return [c for c, r in self._cases.items() if split is None or r.split == split]

    def get(self, case_id: str, anatomies=None, volume: bool = True, crops: bool = True) -> SyntheticRecord:
        r = self._cases[case_id]
        if volume:
            self.get_calls[case_id] += 1
            return r
        return SyntheticRecord(r.case_id, r.patient_id, r.split, None, r.present, r.labels, r.report,
                               r.anatomy_text)


def make_batch(records) -> dict:
    return {"case_ids": [r.case_id for r in records], "x": np.stack([r.volume for r in records])}


class SyntheticModel:
    """Embedding model over :class:`SyntheticDataset` cases; counts its image calls per case."""

    def __init__(self, taxonomy: SyntheticTaxonomy, dim: int = 32, signal: float = 1.0, noise: float = 0.7,
                 seed: int = 0, forward_cost: int = 0):
        rng = np.random.default_rng(seed + 1000)
        self.taxonomy = taxonomy
        self.diagnoses = taxonomy.diagnoses
        self.dim = dim
        self.signal, self.noise = signal, noise
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        self.base = q[:, 0]
        self.dirs = {d.id: q[:, 1 + i] for i, d in enumerate(self.diagnoses)}
        self.text: dict[str, tuple[str, int]] = {}
        for d in self.diagnoses:
            pos, neg = list(d.prompts_positive), list(d.prompts_negative)
            if d.ctrate:
                cp, cn = ctclip_prompts(d.ctrate)
                pos, neg = pos + cp, neg + cn
            for t in pos:
                self.text[t] = (d.id, +1)
            for t in neg:
                self.text[t] = (d.id, -1)
        self.rng = np.random.default_rng(seed + 2000)
        self.image_calls = 0
        self.image_calls_per_case: Counter = Counter()
        self.text_calls = 0
        self.texts_encoded: Counter = Counter()
        self.forward_cost = forward_cost
        self.logit_scale = 20.0

    @staticmethod
    def _norm(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def encode_image(self, batch) -> dict:
        self.image_calls += 1
        self.image_calls_per_case.update(batch["case_ids"])
        if self.forward_cost:  # emulate the cost of a real forward pass (benchmarks)
            m = np.ones((self.forward_cost, self.forward_cost))
            for _ in range(3):
                m = np.tanh(m @ m / self.forward_cost)
        x = np.asarray(batch["x"], np.float64)                        # (B, D) finding indicators
        out = {}
        keys = ["global"] + list(self.taxonomy.anatomies)
        for k in keys:
            e = np.tile(self.base, (x.shape[0], 1))
            for j, d in enumerate(self.diagnoses):
                if k == "global" or d.anatomy == k:
                    e = e + np.outer(self.signal * x[:, j], self.dirs[d.id])
            # deterministic per-case noise so re-encoding gives the same embedding
            for i, cid in enumerate(batch["case_ids"]):
                r = np.random.default_rng(zlib.crc32(f"{cid}|{k}".encode()))
                e[i] += self.noise * r.normal(size=self.dim) / np.sqrt(self.dim) * 3
            out[k] = self._norm(e).astype(np.float32)
        return out

    def encode_text(self, texts, anatomy=None) -> np.ndarray:
        self.text_calls += 1
        self.texts_encoded.update((t, anatomy) for t in texts)
        out = []
        for t in texts:
            if t in self.text:
                did, sign = self.text[t]
                out.append(self.base + sign * self.dirs[did])
            else:  # a report: the directions of the findings it names
                e = self.base.copy()
                for d in self.diagnoses:
                    if d.name + "." in t:
                        e = e + self.signal * self.dirs[d.id]
                out.append(e)
        return self._norm(np.asarray(out)).astype(np.float32)
