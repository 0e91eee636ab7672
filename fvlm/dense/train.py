"""Training of the dense heads (``fvlm dense train``).

- ``seg`` head: softmax over background + the anatomy classes, Dice + cross-entropy
  (or focal) on random crops (3D) or axial-slice crops (2D).
- ``text`` head: prompts are class phrases and finding texts; mixed supervision
  (:class:`fvlm.losses.dense.MixedSupervisionLoss`): full masks for anatomies and
  lesions, image-level labels (absent ones: absent from every crop), and abnormal report
  sentences constrained to lie inside their anatomy (``train.report_sentences``). ``train.unseen_classes`` are
  never prompted, so evaluation can measure zero-shot transfer to them.

Writes ``dense.pt`` (dense checkpoint), ``config.yaml``, ``train_log.jsonl`` and
``train.log`` into the output directory.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FvlmError
from .config import DenseConfig
from .cases import DenseCase, diagnosis_phrase
from .data import (ClassBalancedCentres, class_names_for, class_prompts, class_voxel_counts, load_cases,
                   sample_crop)

__all__ = ["train_dense", "resolve_device", "PromptBank", "class_weights"]

log = logging.getLogger("fvlm.dense")


def resolve_device(name: str):
    """The device the engine trains and evaluates on: the GPU when one is visible (as DeepSpeed
    picks it), else the CPU. ``cpu`` with a visible GPU and ``cuda`` without one are refused."""
    import torch

    has = torch.cuda.is_available()
    if name == "cuda" and not has:
        raise FvlmError("train.device=cuda but no CUDA device is available")
    if name == "cpu" and has:
        raise FvlmError("train.device=cpu but a GPU is visible and the engine trains on it; hide it with "
                        "CUDA_VISIBLE_DEVICES= to train on the CPU")
    return torch.device("cuda" if has else "cpu")


class PromptBank:
    """Embeds prompt phrases once (frozen text encoder) -> ``(T, E)`` per phrase, T = templates."""

    def __init__(self, text_encoder, templates: Sequence[str]):
        self.enc = text_encoder
        self.templates = list(templates)
        self.cache: dict = {}

    @property
    def dim(self) -> int:
        return self.enc.embed_dim

    def __call__(self, phrases: Sequence[str]):
        import torch

        todo = [p for p in dict.fromkeys(phrases) if p not in self.cache]
        if todo:
            texts = [t.format(p) if "{}" in t else f"{t} {p}" for p in todo for t in self.templates]
            with torch.no_grad():
                e = self.enc.encode(texts).float().cpu()
            e = e.reshape(len(todo), len(self.templates), -1)
            for p, v in zip(todo, e):
                self.cache[p] = v
        return torch.stack([self.cache[p] for p in phrases])  # (K, T, E)


def _check_size(cfg: DenseConfig, sd: int):
    if len(cfg.model.img_size) != sd or len(cfg.model.patch_size) != sd:
        raise FvlmError(f"encoder {cfg.model.encoder} is {sd}D: model.img_size and model.patch_size need "
                        f"{sd} values, got {cfg.model.img_size} and {cfg.model.patch_size}")


def class_weights(counts: np.ndarray, cap: float = 10.0) -> np.ndarray:
    """Cross-entropy weights ``(K + 1,)`` from voxel counts per label (index 0 = background).

    ``sqrt(background voxels / class voxels)``, capped at ``cap``: the background keeps weight 1,
    a class 100x rarer gets 10. Labels without training voxels get 1 (they only ever appear
    as false positives).
    """
    counts = np.asarray(counts, np.float64)
    w = np.ones_like(counts)
    present = counts > 0
    if counts[0] > 0:
        w[present] = np.sqrt(counts[0] / counts[present])
    return np.clip(w, None, cap).astype(np.float32)


def _seg_loss(cfg: DenseConfig, cases: Sequence[DenseCase], n_classes: int, dev):
    import torch

    from ..losses.dense import DiceCELoss

    weight = None
    if cfg.train.class_weights == "inverse_sqrt":
        w = class_weights(class_voxel_counts(cases, n_classes), cfg.train.max_class_weight)
        log.info("cross-entropy class weights: %s", " ".join(f"{v:.2f}" for v in w))
        weight = torch.from_numpy(w).to(dev)
    return DiceCELoss(focal_gamma=cfg.train.focal_gamma if cfg.train.loss == "dice_focal" else 0.0, ce_class_weight=weight)


def text_encoder_for(cfg: DenseConfig):
    from ..encoders import TextEncoder

    return TextEncoder(cfg.model.text_model_dir)


def _task_module(model, loss_fn, prompts):
    """The dense model and its loss as one module for the engine: ``forward(batch)`` -> loss parts.

    The network computes logits only; the loss module turns them into the loss (as the X-ray
    task does). The prompt bank (frozen text encoder) is held outside the module's parameters.
    """
    import torch

    class DenseTask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.loss = loss_fn
            self.__dict__["prompts"] = prompts      # not a submodule: never trained, saved or partitioned

        def forward(self, batch: dict) -> dict:
            x = batch["image"]
            if self.model.task == "seg":
                return {"loss": self.loss(self.model(x), batch["label"])}
            emb = self.prompts(batch["prompts"]).to(x.device, x.dtype)          # (B*K, T, E)
            emb = emb.reshape(x.shape[0], batch["k"], *emb.shape[1:])
            return self.loss(self.model(x, emb), batch["mask"], batch["weight"], batch["full"], batch["label"])

    return DenseTask()


def _stream(make_batch, start: int, seed: int, rank: int):
    """Micro-batches ``start, start + 1, ...`` of this rank; batch ``i`` is drawn with its own RNG
    (seed, rank, i), so the stream restarts exactly at any position (resume) and DataLoader workers
    (each takes every ``num_workers``-th index) give the same batches as the main process."""
    import torch

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            i, step = start + (info.id if info else 0), (info.num_workers if info else 1)
            while True:
                yield make_batch(np.random.default_rng([seed, rank, i]))
                i += step

    return Stream()


def train_dense(cfg: DenseConfig, out_dir: str | Path, text_encoder=None, cases: list[DenseCase] | None = None) -> dict:
    """Train a dense model as configured, on the shared engine (:class:`fvlm.engine.trainer.Trainer`:
    schedule, parameter groups, DeepSpeed, exact resume, checkpoints, metrics.csv and TensorBoard).

    Call on every rank (``torchrun`` / the ``deepspeed`` launcher) or in one process. Returns a
    summary with the checkpoint path; ``interrupted`` when stopped early (SIGTERM, ``train.stop_after``).
    """
    import dataclasses

    import torch

    from ..config import dump_config
    from ..engine.loader import make_loader as make_stream_loader
    from ..models import create_model
    from ..models.dense import adopt_pretrained_spec, save_dense
    from ..engine.distributed import init_distributed
    from ..engine.trainer import Trainer

    cfg = dataclasses.replace(cfg, model=adopt_pretrained_spec(cfg.model))
    t = cfg.train
    out = Path(out_dir)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    dev = resolve_device(t.device)
    rank, world, _ = init_distributed()

    if not 0.0 <= t.intensity_jitter < 1.0:
        raise FvlmError(f"train.intensity_jitter must be in [0, 1), got {t.intensity_jitter}")
    class_names = class_names_for(cfg.data)
    if cases is None:
        cases = load_cases(cfg.data, class_names, "train")
    if not cases:
        raise FvlmError("no training cases")
    unseen = set(t.unseen_classes)
    bad = sorted(unseen - set(class_names))
    if bad:
        raise FvlmError(f"train.unseen_classes: {', '.join(bad)} are not among the classes ({', '.join(class_names)})")
    text = None
    if cfg.model.head == "text":
        text = PromptBank(text_encoder or text_encoder_for(cfg), cfg.model.templates)
    torch.manual_seed(t.seed)
    model = create_model("dense", cfg.model, class_names=class_names, text_dim=text.dim if text else None)
    _check_size(cfg, model.spatial_dims)
    if cfg.model.head == "seg":
        loss_fn = _seg_loss(cfg, cases, len(class_names), dev)
    else:
        from ..losses.dense import MixedSupervisionLoss

        loss_fn = MixedSupervisionLoss(label_weight=t.label_weight, focal_gamma=t.focal_gamma,
                                       focal_alpha=t.focal_alpha)
    phrases = class_prompts(cfg.data, class_names)
    text_pool = sorted({(f.text, diagnosis_phrase(f.diagnosis)) for c in cases for f in c.findings if f.diagnosis})
    size = tuple(cfg.model.img_size)
    balanced = ClassBalancedCentres(cases, len(class_names)) if t.crop_sampling == "class_balanced" else None

    def make_batch(rng) -> dict:
        crops = [_crop(cases, size, rng, t.foreground_crop, t.crop_jitter, balanced) for _ in range(cfg.data.batch_size)]
        if t.intensity_jitter > 0:
            j = t.intensity_jitter
            for c in crops:
                c["image"] = c["image"] * np.float32(1 + rng.uniform(-j, j)) + np.float32(rng.uniform(-j, j))
        batch = {"image": torch.from_numpy(np.stack([c["image"] for c in crops]))[:, None]}
        if cfg.model.head == "seg":
            batch["label"] = torch.from_numpy(np.stack([c["label"] for c in crops]).astype(np.int64))
        else:
            batch.update(_text_batch(crops, class_names, phrases, unseen, t.prompts_per_step, rng,
                                     t.report_sentences, t.finding_negatives, text_pool))
        return batch

    def make_loader(start: int):
        return make_stream_loader(_stream(make_batch, start, t.seed, rank), num_workers=cfg.data.num_workers, device=dev)

    meta = {"data_source": cfg.data.source, "spacing_mm": list(cases[0].spacing_mm), "window": list(cfg.data.window),
            "resample_mm": list(cfg.data.spacing_mm), "finding_texts": sorted({f.text for c in cases for f in c.findings}),
            "unseen_classes": sorted(unseen), "class_phrases": phrases, "templates": list(cfg.model.templates),
            "anatomy_set": cfg.data.anatomy_set, "pretrained": cfg.model.pretrained}
    if cfg.data.source == "samples":        # what trained, so that `dense eval` never scores training voxels
        meta.update(holdout=cfg.data.holdout, holdout_z=list(cfg.data.holdout_z), holdout_gap=cfg.data.holdout_gap)
    losses: dict[str, float] = {}

    def on_step(step: int, batch: dict, res: dict) -> None:
        if step == 1 or step % t.log_every == 0 or step == t.steps:   # a host sync only where it is logged
            v = float(res["loss"].detach())
            losses.setdefault("first", v)
            losses["last"] = v

    def save_model(path: Path, module, step: int, state_dict: dict | None = None) -> None:
        sd = None if state_dict is None else {k[len("model."):]: v for k, v in state_dict.items()
                                              if k.startswith("model.")}
        save_dense(path, module.model, cfg.model, text.enc.identity if text else None, text.dim if text else None,
                   {**meta, "steps": step, "final_loss": losses.get("last")}, state_dict=sd)

    task = _task_module(model, loss_fn, text)
    trainer = Trainer(task, lambda res, batch: (res["loss"], {k: v for k, v in res.items() if k != "loss"}),
                      make_loader, t, out, micro_batch=cfg.data.batch_size, save_model=save_model, on_step=on_step,
                      model_file="dense.pt", desc="dense train")
    trainer.resume()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    t0 = time.time()
    res = trainer.fit()
    ckpt = out / "dense.pt"
    if rank == 0:
        log.info("wrote %s (%d process(es))", ckpt, world)
    return {"checkpoint": str(ckpt), "first_loss": losses.get("first"), "final_loss": losses.get("last"),
            "seconds": round(time.time() - t0, 1), "steps": res["step"], "interrupted": res["interrupted"]}

def _crop(cases: Sequence[DenseCase], size, rng, fg_prob, jitter, balanced: ClassBalancedCentres | None = None
          ) -> dict:
    """One training crop: a random case (or, with ``balanced``, the case of a class-balanced centre)."""
    centre = None
    if balanced is not None and rng.random() < fg_prob:
        picked = balanced(rng, [c.image.shape for c in cases])
        if picked is not None:
            case, centre = cases[picked[0]], picked[1]
    if centre is None:
        case = cases[rng.integers(len(cases))]
    masks = [f.mask for f in case.findings]
    img, lab, fm, _ = sample_crop(case, size, rng, fg_prob if balanced is None else 0.0, masks, jitter, centre)
    return {"image": img.astype(np.float32), "label": lab if lab is not None else np.zeros(img.shape, np.uint8),
            "has_label": lab is not None,
            "findings": [(f.text, m, diagnosis_phrase(f.diagnosis)) for f, m in zip(case.findings, fm)], "case": case}


def _text_batch(crops: list[dict], class_names, phrases: dict, unseen: set, per_step: int, rng,
                sentences: bool = True, negatives: int = 0, text_pool: list | None = None) -> dict:
    """Prompts and targets for one step of the text head.

    Every sample of the batch gets the same number of prompts ``K``, in slots:

    1. a shuffled subset of the seen class phrases (shared by the batch), with their masks;
    2. one finding slot: the sample's own finding when its lesion is in the crop (full
       mask), else a finding text that is known to be absent here (all-zero mask): one of
       a diagnosis the case is labelled negative for, or its own finding when the lesion
       lies outside the crop;
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
    import torch

    seen = [i for i, c in enumerate(class_names) if c not in unseen]
    present = set()
    for c in crops:
        present |= {int(v) - 1 for v in np.unique(c["label"]) if v > 0}
    # prefer classes present in the batch so most prompts carry a mask, keep some absent ones
    pres = [i for i in seen if i in present]
    absent = [i for i in seen if i not in present]
    rng.shuffle(pres)
    rng.shuffle(absent)
    n_abs = min(len(absent), max(1, per_step // 4))
    chosen = (pres[:per_step - n_abs] + absent[:n_abs])[:per_step]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    pool = [(t, d) for c in crops for t, _, d in c["findings"]]
    text_pool = list(text_pool) if text_pool else pool
    has_findings = bool(pool)
    n_neg = negatives if text_pool else 0
    has_labels = any(0 in c["case"].labels.values() for c in crops)
    b = len(crops)
    shape = crops[0]["image"].shape
    said = [[(a, t) for a, t in c["case"].sentences if a in class_names and a not in unseen] if sentences else []
            for c in crops]
    has_sentences = any(said)
    k = len(chosen) + int(has_findings) + n_neg + int(has_labels) + int(has_sentences)
    mask = np.zeros((b, k, *shape), np.float32)
    weight = np.ones((b, k, *shape), np.float32)
    full = np.ones((b, k), bool)
    label = np.zeros((b, k), np.float32)
    prompts = []

    def unknown(bi, j):
        full[bi, j] = False
        weight[bi, j] = 0.0
        label[bi, j] = -1.0

    for bi, c in enumerate(crops):
        for j, ci in enumerate(chosen):
            m = c["label"] == ci + 1
            mask[bi, j] = m
            label[bi, j] = float(m.any())
            prompts.append(phrases[class_names[ci]])
        j = len(chosen)
        known_absent = {p for p, v in c["case"].labels.items() if v == 0}
        if has_findings:
            own = [(t, m) for t, m, _ in c["findings"] if m.any()]
            if own:
                t, m = own[rng.integers(len(own))]
                mask[bi, j] = m
                label[bi, j] = 1.0
            else:
                others = [t for t, d in pool if d in known_absent]
                if others:
                    t = others[rng.integers(len(others))]
                elif c["findings"]:  # its own finding, outside this crop: absent from the crop
                    t = c["findings"][0][0]
                else:
                    t = pool[rng.integers(len(pool))][0]
                    unknown(bi, j)
            prompts.append(t)
            j += 1
        for _ in range(n_neg):
            cand = [t for t, d in text_pool if d in known_absent]
            if cand:
                prompts.append(cand[rng.integers(len(cand))])
            else:
                prompts.append(text_pool[rng.integers(len(text_pool))][0])
                unknown(bi, j)
            j += 1
        if has_labels:
            # image-level supervision: a diagnosis absent from the whole image is absent from the crop
            neg = sorted(known_absent)
            if neg:
                prompts.append(neg[rng.integers(len(neg))])
            else:  # nothing known to be absent here: the slot carries no loss
                prompts.append(next(p for cc in crops for p, v in cc["case"].labels.items() if v == 0))
                unknown(bi, j)
            j += 1
        if has_sentences:
            # report text: the finding lies inside the named anatomy; where inside is unknown
            full[bi, j] = False
            label[bi, j] = -1.0
            if said[bi] and c["has_label"]:
                a, t = said[bi][rng.integers(len(said[bi]))]
                weight[bi, j] = c["label"] != class_names.index(a) + 1
            else:
                t = next(t for s in said if s for _, t in s)
                weight[bi, j] = 0.0
            prompts.append(t)
    return {"prompts": prompts, "k": k, "mask": torch.from_numpy(mask), "weight": torch.from_numpy(weight),
            "full": torch.from_numpy(full), "label": torch.from_numpy(label)}
