"""Training batches of ``fvlm dense train``: the batch stream and what one batch holds.

:class:`DenseStream` is the program's :class:`~fvlm.data.stream.BatchStream`: batch ``b`` of a rank
is drawn with its own RNG ``(seed, rank, b)``, so the stream restarts exactly at any position
(resume) and DataLoader workers give the same batches as the main process. A batch is
``data.batch_size`` training crops (:func:`fvlm.dense.data.training_crop`, the one home of crop
sampling) with their targets: the label map (``seg`` head) or the prompt slots (``text`` head,
:func:`text_batch`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data.stream import BatchStream
from .cases import DenseCase
from .data import ClassBalancedCentres, training_crop

__all__ = ["DenseStream", "DenseBatches", "text_batch"]


class DenseBatches:
    """``make(rng)`` -> one training batch: ``{"image": (B, 1, *size), "label"}`` for the ``seg``
    head, ``{"image", "prompts", "k", "mask", "weight", "full", "label"}`` for the ``text`` head."""

    def __init__(self, cfg, cases: Sequence[DenseCase], class_names: Sequence[str], phrases: dict, unseen: set,
                 text_pool: list):
        t = cfg.train
        self.cfg, self.t, self.cases = cfg, t, cases
        self.class_names, self.phrases, self.unseen, self.text_pool = class_names, phrases, unseen, text_pool
        self.size = tuple(cfg.model.img_size)
        self.balanced = (ClassBalancedCentres(cases, len(class_names)) if t.crop_sampling == "class_balanced"
                         else None)

    def __call__(self, rng: np.random.Generator) -> dict:
        t = self.t
        crops = [training_crop(self.cases, self.size, rng, t.foreground_crop, t.crop_jitter, self.balanced)
                 for _ in range(self.cfg.data.batch_size)]
        if t.intensity_jitter > 0:
            j = t.intensity_jitter
            for c in crops:
                c["image"] = c["image"] * np.float32(1 + rng.uniform(-j, j)) + np.float32(rng.uniform(-j, j))
        batch = {"image": torch.from_numpy(np.stack([c["image"] for c in crops]))[:, None]}
        if self.cfg.model.head == "seg":
            batch["label"] = torch.from_numpy(np.stack([c["label"] for c in crops]).astype(np.int64))
        else:
            batch.update(text_batch(crops, self.class_names, self.phrases, self.unseen, t.prompts_per_step, rng,
                                    t.report_sentences, t.finding_negatives, self.text_pool))
        return batch


class DenseStream(BatchStream):
    """Micro-batches ``start, start + 1, ...`` of this rank; batch ``b`` = ``make_batch(rng(seed, rank, b))``."""

    def __init__(self, make_batch, start: int, seed: int, rank: int):
        self.make_batch, self.start, self.seed, self.rank = make_batch, int(start), seed, rank

    def make(self, b: int) -> dict:
        return self.make_batch(np.random.default_rng([self.seed, self.rank, b]))


# --------------------------------------------------------------------------- text head targets


def _choose_classes(crops: list[dict], class_names, unseen: set, per_step: int, rng) -> list[int]:
    """The class prompts of the step (shared by the batch): a shuffled subset of the seen classes,
    those present in the batch first (so most prompts carry a mask), some absent ones kept."""
    seen = [i for i, c in enumerate(class_names) if c not in unseen]
    present = set()
    for c in crops:
        present |= {int(v) - 1 for v in np.unique(c["label"]) if v > 0}
    pres = [i for i in seen if i in present]
    absent = [i for i in seen if i not in present]
    rng.shuffle(pres)
    rng.shuffle(absent)
    n_abs = min(len(absent), max(1, per_step // 4))
    chosen = (pres[:per_step - n_abs] + absent[:n_abs])[:per_step]
    return [chosen[i] for i in rng.permutation(len(chosen))]


class _Slots:
    """The targets of ``k`` prompt slots for ``b`` samples: masks, voxel weights, whether the mask is
    fully known, image-level labels, and the prompt texts in (sample, slot) order."""

    def __init__(self, b: int, k: int, shape):
        self.mask = np.zeros((b, k, *shape), np.float32)
        self.weight = np.ones((b, k, *shape), np.float32)
        self.full = np.ones((b, k), bool)
        self.label = np.zeros((b, k), np.float32)
        self.prompts: list[str] = []

    def unknown(self, bi: int, j: int) -> None:
        """Nothing is known for sample ``bi`` in slot ``j``: no loss there."""
        self.full[bi, j] = False
        self.weight[bi, j] = 0.0
        self.label[bi, j] = -1.0

    def tensors(self, k: int) -> dict:
        return {"prompts": self.prompts, "k": k, "mask": torch.from_numpy(self.mask),
                "weight": torch.from_numpy(self.weight), "full": torch.from_numpy(self.full),
                "label": torch.from_numpy(self.label)}


def _finding_slot(s: _Slots, bi: int, j: int, c: dict, pool: list, known_absent: set, rng) -> None:
    """The sample's own finding when its lesion is in the crop (full mask), else a finding text known
    to be absent here (one of a diagnosis the case is labelled negative for, or its own finding whose
    lesion lies outside the crop); nothing known: another finding, no loss."""
    own = [(t, m) for t, m, _ in c["findings"] if m.any()]
    if own:
        t, m = own[rng.integers(len(own))]
        s.mask[bi, j] = m
        s.label[bi, j] = 1.0
    else:
        others = [t for t, d in pool if d in known_absent]
        if others:
            t = others[rng.integers(len(others))]
        elif c["findings"]:  # its own finding, outside this crop: absent from the crop
            t = c["findings"][0][0]
        else:
            t = pool[rng.integers(len(pool))][0]
            s.unknown(bi, j)
    s.prompts.append(t)


def _negative_slot(s: _Slots, bi: int, j: int, text_pool: list, known_absent: set, rng) -> None:
    """A finding text of a diagnosis the case is labelled negative for (all-zero target)."""
    cand = [t for t, d in text_pool if d in known_absent]
    if cand:
        s.prompts.append(cand[rng.integers(len(cand))])
    else:
        s.prompts.append(text_pool[rng.integers(len(text_pool))][0])
        s.unknown(bi, j)


def _label_slot(s: _Slots, bi: int, j: int, crops: list[dict], known_absent: set, rng) -> None:
    """Image-level supervision: a diagnosis absent from the whole image is absent from the crop."""
    neg = sorted(known_absent)
    if neg:
        s.prompts.append(neg[rng.integers(len(neg))])
    else:  # nothing known to be absent here: the slot carries no loss
        s.prompts.append(next(p for cc in crops for p, v in cc["case"].labels.items() if v == 0))
        s.unknown(bi, j)


def _sentence_slot(s: _Slots, bi: int, j: int, c: dict, said: list, class_names, rng) -> None:
    """Report text: the finding lies inside the named anatomy (0 outside it); where inside is unknown."""
    s.full[bi, j] = False
    s.label[bi, j] = -1.0
    if said[bi] and c["has_label"]:
        a, t = said[bi][rng.integers(len(said[bi]))]
        s.weight[bi, j] = c["label"] != class_names.index(a) + 1
    else:
        t = next(t for ss in said if ss for _, t in ss)
        s.weight[bi, j] = 0.0
    s.prompts.append(t)


def text_batch(crops: list[dict], class_names, phrases: dict, unseen: set, per_step: int, rng,
               sentences: bool = True, negatives: int = 0, text_pool: list | None = None) -> dict:
    """Prompts and targets for one step of the text head.

    Every sample of the batch gets the same number of prompts ``K``, in slots:

    1. a shuffled subset of the seen class phrases (shared by the batch), with their masks;
    2. one finding slot (:func:`_finding_slot`);
    3. ``negatives`` more slots, each a finding text (from ``text_pool``, default the
       batch's findings) of a diagnosis the case is labelled negative for: all-zero
       targets that teach the head to answer the text, not just "a lesion is here";
    4. one image-level slot: a diagnosis phrase labelled absent for the case (absent from
       the image means absent from every crop; image-level *positives* say nothing about
       a crop);
    5. with ``sentences``, when a case of the batch has abnormal report sentences of a
       segmented anatomy: one report slot, such a sentence, known to be 0 outside its
       anatomy and unknown inside (the report says what, not where).

    A slot with nothing known for a sample carries no loss there (weight 0, label -1).
    """
    chosen = _choose_classes(crops, class_names, unseen, per_step, rng)
    pool = [(t, d) for c in crops for t, _, d in c["findings"]]
    text_pool = list(text_pool) if text_pool else pool
    has_findings = bool(pool)
    n_neg = negatives if text_pool else 0
    has_labels = any(0 in c["case"].labels.values() for c in crops)
    said = [[(a, t) for a, t in c["case"].sentences if a in class_names and a not in unseen] if sentences else []
            for c in crops]
    has_sentences = any(said)
    k = len(chosen) + int(has_findings) + n_neg + int(has_labels) + int(has_sentences)
    s = _Slots(len(crops), k, crops[0]["image"].shape)
    for bi, c in enumerate(crops):
        for j, ci in enumerate(chosen):
            m = c["label"] == ci + 1
            s.mask[bi, j] = m
            s.label[bi, j] = float(m.any())
            s.prompts.append(phrases[class_names[ci]])
        j = len(chosen)
        known_absent = {p for p, v in c["case"].labels.items() if v == 0}
        if has_findings:
            _finding_slot(s, bi, j, c, pool, known_absent, rng)
            j += 1
        for _ in range(n_neg):
            _negative_slot(s, bi, j, text_pool, known_absent, rng)
            j += 1
        if has_labels:
            _label_slot(s, bi, j, crops, known_absent, rng)
            j += 1
        if has_sentences:
            _sentence_slot(s, bi, j, c, said, class_names, rng)
    return s.tensors(k)
