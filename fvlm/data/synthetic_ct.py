"""Synthetic CT cases with planted, report-consistent findings (tests, benchmarks, CPU demos).

Each case is a small volume (HU, RAS+ ``[x, y, z]``) of air, a soft-tissue body and a few
ellipsoid organs at jittered positions, with a label map, per-anatomy crops, a report whose
sentences describe exactly the planted findings, per-anatomy text (status + sentences) and
diagnosis labels, i.e. the same fields a :class:`fvlm.data.shards.CaseRecord` has. Findings:

- ``<anatomy>_lesion``: a bright (+350 HU) sphere inside the organ;
- ``<anatomy>_hypodense``: the whole organ 90 HU darker;
- ``medical_material`` (global): a very bright (+2500 HU) small cube outside the organs.

Everything is a pure function of ``(seed, index)``, so any worker/rank generates the same case.
The source has the small part of the ``ShardDataset`` API the training code uses
(``anatomies``, ``case_ids(split)``, ``get(case_id, ...)``) plus ``diagnoses`` (taxonomy-like
dicts with prompts) for the quick zero-shot validation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shards import AIR_HU, CaseRecord
from ..taxonomy import ABNORMAL, NORMAL, NOT_MENTIONED

__all__ = ["SyntheticCTSource", "ORGANS"]

#: organ id -> (centre as a fraction of the volume [x, y, z], semi-axes fraction, base HU)
ORGANS = {
    "lung": ((0.5, 0.55, 0.7), (0.32, 0.22, 0.22), -820),
    "heart": ((0.55, 0.4, 0.55), (0.14, 0.13, 0.14), 40),
    "liver": ((0.35, 0.45, 0.3), (0.18, 0.17, 0.16), 60),
    "kidney": ((0.7, 0.62, 0.22), (0.09, 0.1, 0.12), 30),
    "spleen": ((0.72, 0.6, 0.38), (0.08, 0.09, 0.1), 45),
    "aorta": ((0.5, 0.65, 0.45), (0.05, 0.05, 0.4), 50),
}

_NORMAL = ["The {n} is normal.", "No abnormality of the {n}.", "The {n} is unremarkable."]
_LESION = ["There is a hyperdense lesion in the {n}.", "A dense mass is seen in the {n}."]
_HYPO = ["The {n} is diffusely hypodense.", "Diffuse low attenuation of the {n}."]


@dataclass
class _Case:
    findings: dict          # anatomy -> set of finding kinds
    material: bool
    mentioned: dict         # anatomy -> bool (normal organs may be left out of the report)


class SyntheticCTSource:
    """``n`` synthetic cases; the last ``val_fraction`` of them are split ``valid``.

    Args:
        n: number of cases.
        anatomies: organ ids (subset of :data:`ORGANS`, label-map order).
        shape: volume shape ``(X, Y, Z)``; crops are ``crop_shape`` around each organ.
        prevalence: probability of each finding per organ.
        seed: all randomness derives from ``(seed, case index)``.
    """

    def __init__(self, n: int = 64, anatomies=("lung", "heart", "liver", "kidney"), shape=(64, 64, 32),
                 crop_shape=(32, 32, 16), prevalence: float = 0.25, val_fraction: float = 0.25,
                 seed: int = 0, noise_hu: float = 20.0, mention_normal: float = 0.7):
        bad = [a for a in anatomies if a not in ORGANS]
        if bad:
            raise ValueError(f"unknown synthetic organ {bad[0]!r} (known: {', '.join(ORGANS)})")
        self.n = int(n)
        self.anatomies = list(anatomies)
        self.shape = tuple(int(s) for s in shape)
        self.crop_shapes = {a: tuple(int(s) for s in crop_shape) for a in self.anatomies}
        self.prevalence = float(prevalence)
        self.seed = int(seed)
        self.noise_hu = float(noise_hu)
        self.mention_normal = float(mention_normal)
        n_val = int(round(self.n * val_fraction))
        self._split = ["train"] * (self.n - n_val) + ["valid"] * n_val
        self._grid = np.stack(np.meshgrid(*[(np.arange(s) + 0.5) / s for s in self.shape], indexing="ij"))

    # -- taxonomy-like description
    @property
    def diagnoses(self) -> list[dict]:
        out = []
        for a in self.anatomies:
            out.append(dict(id=f"{a}_lesion", name=f"{a} lesion", anatomy=a,
                            prompts_positive=[_LESION[0].format(n=a)], prompts_negative=[_NORMAL[0].format(n=a)]))
            out.append(dict(id=f"{a}_hypodense", name=f"hypodense {a}", anatomy=a,
                            prompts_positive=[_HYPO[0].format(n=a)], prompts_negative=[_NORMAL[0].format(n=a)]))
        out.append(dict(id="medical_material", name="medical material", anatomy="global",
                        prompts_positive=["Medical material is present."],
                        prompts_negative=["No medical material."]))
        return out

    def case_ids(self, split: str | None = None) -> list[str]:
        return [f"syn{i:05d}" for i in range(self.n) if split is None or self._split[i] == split]

    def __len__(self) -> int:
        return self.n

    def _index(self, case_id: str) -> int:
        return int(case_id[3:])

    def _plan(self, rng: np.random.Generator) -> _Case:
        findings = {}
        mentioned = {}
        for a in self.anatomies:
            f = set()
            if rng.random() < self.prevalence:
                f.add("lesion")
            if rng.random() < self.prevalence:
                f.add("hypodense")
            findings[a] = f
            mentioned[a] = bool(f) or rng.random() < self.mention_normal
        return _Case(findings, bool(rng.random() < self.prevalence), mentioned)

    def get(self, case_id: str, anatomies=None, volume: bool = True, crops: bool = True) -> CaseRecord:
        i = self._index(case_id)
        rng = np.random.default_rng([self.seed, i])
        plan = self._plan(rng)
        X, Y, Z = self.shape
        g = self._grid
        body = (((g[0] - 0.5) / 0.46) ** 2 + ((g[1] - 0.5) / 0.4) ** 2) <= 1
        vol = np.where(body, 0.0, float(AIR_HU)) + rng.normal(0, self.noise_hu, self.shape)
        lab = np.zeros(self.shape, np.uint8)
        bbox = {}
        for k, a in enumerate(self.anatomies):
            c, r, hu = ORGANS[a]
            c = np.array(c) + rng.uniform(-0.03, 0.03, 3)
            r = np.array(r) * rng.uniform(0.9, 1.1, 3)
            m = (((g - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1
            m &= lab == 0
            lab[m] = k + 1
            val = hu - (90 if "hypodense" in plan.findings[a] else 0)
            vol[m] = val + rng.normal(0, self.noise_hu, int(m.sum()))
            if "lesion" in plan.findings[a]:
                lc = c + rng.uniform(-0.4, 0.4, 3) * r
                lr = 0.35 * r.min()
                les = ((((g - lc[:, None, None, None]) / lr) ** 2).sum(0) <= 1) & m
                vol[les] += 350
            idx = np.argwhere(m)
            bbox[a] = tuple(idx.min(0).tolist() + (idx.max(0) + 1).tolist()) if len(idx) else None
        if plan.material:
            s = max(2, X // 16)
            p = rng.integers([X // 8, Y // 8, 0], [X - X // 8 - s, Y // 3, Z - s])
            vol[p[0]:p[0] + s, p[1]:p[1] + s, p[2]:p[2] + s] = 2500
        vol = np.clip(vol, -1024, 3071).astype(np.int16)

        anatomy_text, sentences, labels = {}, [], {}
        for a in self.anatomies:
            f = plan.findings[a]
            labels[f"{a}_lesion"] = int("lesion" in f)
            labels[f"{a}_hypodense"] = int("hypodense" in f)
            if f:
                s = []
                if "lesion" in f:
                    s.append(_LESION[rng.integers(len(_LESION))].format(n=a))
                if "hypodense" in f:
                    s.append(_HYPO[rng.integers(len(_HYPO))].format(n=a))
                anatomy_text[a] = {"status": ABNORMAL, "sentences": s}
            elif plan.mentioned[a]:
                anatomy_text[a] = {"status": NORMAL, "sentences": [_NORMAL[rng.integers(len(_NORMAL))].format(n=a)]}
            else:
                anatomy_text[a] = {"status": NOT_MENTIONED, "sentences": []}
            sentences += anatomy_text[a]["sentences"]
        labels["medical_material"] = int(plan.material)
        impressions = "Medical material is present." if plan.material else ""
        rec = CaseRecord(case_id=case_id, patient_id=f"p{i:05d}", split=self._split[i], spacing_mm=(1.0, 1.0, 3.0),
                         present={a: bbox[a] is not None for a in self.anatomies},
                         report={"findings": " ".join(sentences), "impressions": impressions,
                                 "report": " ".join(sentences + [impressions]).strip()},
                         anatomy_text=anatomy_text, labels=labels, meta={"synthetic": True}, bbox=bbox)
        if volume:
            rec.volume, rec.label_map = vol, lab
        if crops:
            for k, a in enumerate(anatomies or self.anatomies):
                rec.crops[a], rec.crop_masks[a] = self._crop(vol, lab, self.anatomies.index(a) + 1, bbox[a],
                                                             self.crop_shapes[a])
        return rec

    @staticmethod
    def _crop(vol, lab, label, bb, shape):
        out = np.full(shape, AIR_HU, np.int16)
        msk = np.zeros(shape, np.uint8)
        if bb is None:
            return out, msk
        ctr = [(bb[d] + bb[d + 3]) // 2 for d in range(3)]
        src, dst = [], []
        for d in range(3):
            lo = ctr[d] - shape[d] // 2
            s0, s1 = max(lo, 0), min(lo + shape[d], vol.shape[d])
            src.append(slice(s0, s1))
            dst.append(slice(s0 - lo, s1 - lo))
        out[tuple(dst)] = vol[tuple(src)]
        msk[tuple(dst)] = (lab[tuple(src)] == label)
        return out, msk
