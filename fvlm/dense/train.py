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

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import encoders
from ..config import dump_config
from ..engine.distributed import init_distributed
from ..engine.loader import make_loader as make_stream_loader
from ..engine.trainer import Trainer
from ..errors import FvlmError
from ..losses.dense import DiceCELoss, MixedSupervisionLoss
from ..models import create_model
from ..models.dense import adopt_pretrained_spec, save_dense
from .batch import DenseBatches, DenseStream
from .batch import text_batch as _text_batch  # noqa: F401 - its earlier home
from .cases import DenseCase, diagnosis_phrase
from .config import DenseConfig
from .data import class_names_for, class_prompts, class_voxel_counts, load_cases
from .task import DenseTask, PromptBank

__all__ = ["run", "train_dense", "resolve_device", "PromptBank", "class_weights"]

log = logging.getLogger("fvlm.dense")


def resolve_device(name: str):
    """The device the engine trains and evaluates on: the GPU when one is visible (as DeepSpeed
    picks it), else the CPU. ``cpu`` with a visible GPU and ``cuda`` without one are refused."""
    has = torch.cuda.is_available()
    if name == "cuda" and not has:
        raise FvlmError("train.device=cuda but no CUDA device is available")
    if name == "cpu" and has:
        raise FvlmError("train.device=cpu but a GPU is visible and the engine trains on it; hide it with "
                        "CUDA_VISIBLE_DEVICES= to train on the CPU")
    return torch.device("cuda" if has else "cpu")


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


def _loss(cfg: DenseConfig, cases: Sequence[DenseCase], n_classes: int, dev):
    """The loss module of the head: Dice + cross-entropy/focal (``seg``), mixed supervision (``text``)."""
    t = cfg.train
    if cfg.model.head != "seg":
        return MixedSupervisionLoss(label_weight=t.label_weight, focal_gamma=t.focal_gamma, focal_alpha=t.focal_alpha)
    weight = None
    if t.class_weights == "inverse_sqrt":
        w = class_weights(class_voxel_counts(cases, n_classes), t.max_class_weight)
        log.info("cross-entropy class weights: %s", " ".join(f"{v:.2f}" for v in w))
        weight = torch.from_numpy(w).to(dev)
    return DiceCELoss(focal_gamma=t.focal_gamma if t.loss == "dice_focal" else 0.0, ce_class_weight=weight)


def text_encoder_for(cfg: DenseConfig):
    return encoders.TextEncoder(cfg.model.text_model_dir)


def _training_cases(cfg: DenseConfig, cases: list[DenseCase] | None) -> tuple[list[str], list[DenseCase], set]:
    """``(class names, training cases, unseen classes)``, checked."""
    t = cfg.train
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
    return class_names, cases, unseen


def _meta(cfg: DenseConfig, cases: Sequence[DenseCase], unseen: set, phrases: dict) -> dict:
    """What ``dense.pt`` records about the training data, prompts and encoder start."""
    meta = {"data_source": cfg.data.source, "spacing_mm": list(cases[0].spacing_mm), "window": list(cfg.data.window),
            "resample_mm": list(cfg.data.spacing_mm),
            "finding_texts": sorted({f.text for c in cases for f in c.findings}),
            "unseen_classes": sorted(unseen), "class_phrases": phrases, "templates": list(cfg.model.templates),
            "anatomy_set": cfg.data.anatomy_set, "pretrained": cfg.model.pretrained}
    if cfg.data.source == "samples":        # what trained, so that `dense eval` never scores training voxels
        meta.update(holdout=cfg.data.holdout, holdout_z=list(cfg.data.holdout_z), holdout_gap=cfg.data.holdout_gap)
    return meta


def _loss_parts(res: dict, batch: dict) -> tuple:   # noqa: ARG001 - the engine's loss_fn(outputs, batch)
    return res["loss"], {k: v for k, v in res.items() if k != "loss"}


def run(cfg: DenseConfig, out_dir: str | Path, text_encoder=None, cases: list[DenseCase] | None = None) -> dict:
    """Train a dense model as configured, on the shared engine (:class:`fvlm.engine.trainer.Trainer`:
    schedule, parameter groups, DeepSpeed, exact resume, checkpoints, metrics.csv and TensorBoard).

    Call on every rank (``torchrun`` / the ``deepspeed`` launcher) or in one process. Returns a
    summary with the checkpoint path; ``interrupted`` when stopped early (SIGTERM, ``train.stop_after``).
    """
    cfg = dataclasses.replace(cfg, model=adopt_pretrained_spec(cfg.model))
    t = cfg.train
    out = Path(out_dir)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    dev = resolve_device(t.device)
    rank, world, _ = init_distributed()
    class_names, cases, unseen = _training_cases(cfg, cases)
    text = None
    if cfg.model.head == "text":
        text = PromptBank(text_encoder or text_encoder_for(cfg), cfg.model.templates)
    torch.manual_seed(t.seed)
    model = create_model("dense", cfg.model, class_names=class_names, text_dim=text.dim if text else None)
    _check_size(cfg, model.spatial_dims)
    loss_fn = _loss(cfg, cases, len(class_names), dev)
    phrases = class_prompts(cfg.data, class_names)
    text_pool = sorted({(f.text, diagnosis_phrase(f.diagnosis)) for c in cases for f in c.findings if f.diagnosis})
    make_batch = DenseBatches(cfg, cases, class_names, phrases, unseen, text_pool)

    def make_loader(start: int):
        return make_stream_loader(DenseStream(make_batch, start, t.seed, rank), num_workers=cfg.data.num_workers,
                                  device=dev)

    meta = _meta(cfg, cases, unseen, phrases)
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

    trainer = Trainer(DenseTask(model, loss_fn, text), _loss_parts, make_loader, t, out,
                      micro_batch=cfg.data.batch_size, save_model=save_model, on_step=on_step,
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


#: the name ``fvlm dense train`` and earlier callers use
train_dense = run
