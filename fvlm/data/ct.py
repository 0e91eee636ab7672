"""From CaseRecords to model batches: sample transform, collate, and the streaming training set.

``record_to_sample(rec, cfg)`` is the one input transform, shared by training and the
zero-shot suite (``make_batch_fn``). A sample holds (A = number of anatomies of ``cfg``):

=================  ==========================  ============================================
key                type / shape                meaning
=================  ==========================  ============================================
``volume``         float32 ``(1, X, Y, Z)``    windowed to [0, 1], fitted into ``volume_size`` (aspect kept, air-padded)
``label_map``      uint8 ``(X, Y, Z)``         0 background, ``i + 1`` = ``anatomies[i]``
``crops``          float32 ``(A, 1, x, y, z)`` windowed crops resized to ``crop_size``
``crop_masks``     uint8 ``(A, x, y, z)``      the anatomy mask on its crop
``present``        bool ``(A,)``               anatomy segmented in this scan
``has_text``       bool ``(A,)``               a text exists for it (sentences or template)
``status``         int64 ``(A,)``              0 not mentioned, 1 normal, 2 abnormal
``texts``          list of A str               per-anatomy text ("" when none)
``global_text``    str                         findings + impressions
``global_status``  int64 ``()``                1 when nothing abnormal and no positive label
``labels``         float32 ``(D,)``            silver labels for ``cfg.diagnoses`` (1/0/-1)
``case_id``        str
=================  ==========================  ============================================

``collate`` stacks tensors and keeps strings as lists (``texts`` becomes ``B`` lists of A).
Augmentation (MONAI, optional) never flips left-right: lateral findings ("left lower lobe")
would no longer match their text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from ..config import opt
from ..errors import FvlmError
from ..taxonomy import NOT_MENTIONED, STATUS_ABNORMAL, STATUS_CODES, STATUS_NORMAL, STATUS_NOT_MENTIONED
from .inputs import RAW_KEY, build_inputs, fit_size, read_regions, regions_of
from .stream import BatchStream

__all__ = ["AugmentConfig", "CTDataConfig", "record_to_sample", "collate", "make_batch_fn", "CTStream",
           "SampleOptions"]


@dataclass
class AugmentConfig:
    enabled: bool = opt(False, "random affine + intensity augmentation (training only; never flips)")
    prob: float = opt(0.5, "probability of each random transform")
    rotate_deg: float = opt(8.0, "max rotation about each axis (degrees)")
    scale: float = opt(0.08, "max relative zoom")
    intensity_shift: float = opt(0.05, "max shift of windowed intensities")
    intensity_scale: float = opt(0.1, "max relative scale of windowed intensities")
    noise_std: float = opt(0.01, "std of additive Gaussian noise on windowed intensities")


@dataclass
class CTDataConfig:
    shards: str | None = opt(None, "directory written by `fvlm preprocess` (null: use data.synthetic)")
    synthetic: dict[str, Any] = opt({}, "keyword arguments of fvlm.data.synthetic_ct.SyntheticCTSource "
                                    "(used when shards is null), e.g. {n: 400, shape: [64, 64, 32]}")
    train_split: str = opt("train", "split used for training")
    val_split: str = opt("valid", "split used for validation during training")
    anatomies: list[str] = opt([], "anatomy ids to train on ([] = all of the dataset, in its order)")
    window: tuple[float, float] = opt((-1150.0, 350.0), "HU window [lo, hi] mapped to [0, 1] at load")
    anatomy_windows: dict[str, tuple[float, float]] = opt(
        {}, "per-anatomy HU windows for crops, e.g. {lung: [-1000, 0], liver: [-150, 250]} (others use window)")
    volume_size: list[int] = opt([64, 64, 32], "whole volume resized to this [X, Y, Z] (volume mode, global)")
    crop_size: list[int] | None = opt(None, "deprecated (the crop size is model.image.img_size in crop mode); "
                                            "a value must equal it")
    antialias: bool = opt(False, "shrinks of more than 1.5x average the source over each output voxel (area) "
                                 "instead of reading its 2 nearest voxels per axis, so small structures are not "
                                 "dropped or kept by chance (images only; label maps stay nearest)")
    cache: str = opt("auto", "model-input cache of `fvlm cache` (cases already on the model's grid): auto = "
                             "<shards>/cache/<key> when it exists for this input, off, or a cache folder")
    load_volume: bool = opt(True, "read whole volumes + label maps (volume mode and the global embedding)")
    load_crops: bool = opt(False, "read per-anatomy crops (crop mode)")
    sentences: Literal["all", "random"] = opt("all", "per-anatomy text: all sentences joined, or a random "
                                              "subset of up to max_sentences each step")
    max_sentences: int = opt(0, "limit on sentences per anatomy text (0 = no limit)")
    unmentioned: Literal["skip", "normal"] = opt(
        "normal", "anatomy not mentioned in the report: skip it (masked out) or use normal_template")
    normal_template: str = opt("The {name} is normal.", "text for unmentioned anatomies ({name} = anatomy)")
    global_text: Literal["findings_impressions", "findings", "impressions", "report"] = opt(
        "findings_impressions", "text of the global embedding")
    diagnoses: list[str] = opt([], "diagnosis ids carried as labels ([] = taxonomy's, or all the data has)")
    taxonomy: str | None = opt(None, "taxonomy name/path giving diagnoses, their anatomies and prompts")
    batch_size: int = opt(8, "samples per micro-batch per rank")
    num_workers: int = opt(0, "DataLoader worker processes per rank")
    prefetch_factor: int = opt(2, "batches prefetched per worker")
    augment: AugmentConfig = opt(AugmentConfig(), "training augmentation")

    def __post_init__(self):
        for name, (lo, hi) in [("window", self.window), *((f"anatomy_windows.{a}", w)
                                                         for a, w in self.anatomy_windows.items())]:
            if not lo < hi:
                raise ValueError(f"data.{name} must be [lo, hi] with lo < hi (HU), got [{lo}, {hi}]")


@dataclass
class SampleOptions:
    """The part of the data config a model needs at inference (embedded in checkpoints)."""
    anatomies: list[str]
    window: tuple[float, float] = (-1150.0, 350.0)
    anatomy_windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    volume_size: list[int] | None = field(default_factory=lambda: [64, 64, 32])
    crop_size: list[int] | None = None
    sentences: str = "all"
    max_sentences: int = 0
    unmentioned: str = "normal"
    normal_template: str = "The {name} is normal."
    global_text: str = "findings_impressions"
    diagnoses: list[str] = field(default_factory=list)
    anatomy_names: dict[str, str] = field(default_factory=dict)
    antialias: bool = False

    @classmethod
    def from_config(cls, cfg: CTDataConfig, anatomies: Sequence[str], diagnoses: Sequence[str],
                    anatomy_names: dict | None = None) -> "SampleOptions":
        return cls(anatomies=list(anatomies), window=tuple(cfg.window),
                   anatomy_windows={a: tuple(w) for a, w in cfg.anatomy_windows.items()},
                   volume_size=list(cfg.volume_size) if cfg.load_volume else None,
                   crop_size=list(cfg.crop_size) if cfg.load_crops else None, sentences=cfg.sentences,
                   max_sentences=cfg.max_sentences, unmentioned=cfg.unmentioned,
                   normal_template=cfg.normal_template, global_text=cfg.global_text,
                   diagnoses=list(diagnoses), anatomy_names=dict(anatomy_names or {}), antialias=bool(cfg.antialias))

    def to_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}
        d["anatomy_windows"] = {a: list(w) for a, w in self.anatomy_windows.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SampleOptions":
        d = dict(d)
        d["window"] = tuple(d.get("window", (-1150.0, 350.0)))
        d["anatomy_windows"] = {a: tuple(w) for a, w in (d.get("anatomy_windows") or {}).items()}
        return cls(**d)


# --------------------------------------------------------------------------- one sample


def _text(sentences: list[str], opts: SampleOptions, rng: np.random.Generator | None) -> str:
    s = list(sentences)
    if opts.sentences == "random" and rng is not None and len(s) > 1:
        k = len(s) if opts.max_sentences <= 0 else min(opts.max_sentences, len(s))
        k = int(rng.integers(1, k + 1))
        keep = sorted(rng.choice(len(s), size=k, replace=False).tolist())
        s = [s[i] for i in keep]
    elif opts.max_sentences > 0:
        s = s[:opts.max_sentences]
    return " ".join(x.strip() for x in s if x and x.strip())


def _global_text(report: dict, how: str) -> str:
    f, i = (report.get("findings") or "").strip(), (report.get("impressions") or "").strip()
    if how == "findings":
        return f
    if how == "impressions":
        return i
    if how == "report":
        return (report.get("report") or "").strip() or " ".join(x for x in (f, i) if x)
    return " ".join(x for x in (f, i) if x)


def _text_fields(rec, opts: SampleOptions, rng: np.random.Generator | None) -> dict:
    """The non-image keys of a sample (texts, statuses, labels); ``rng`` draws random sentence subsets."""
    anats = opts.anatomies
    present = torch.tensor([bool(rec.present.get(a, False)) for a in anats], dtype=torch.bool)
    texts, status, has_text = [], [], []
    for a in anats:
        at = (rec.anatomy_text or {}).get(a) or {}
        st = STATUS_CODES.get(at.get("status", NOT_MENTIONED), STATUS_NOT_MENTIONED)
        t = _text(at.get("sentences") or [], opts, rng)
        if not t and opts.unmentioned == "normal" and st != STATUS_ABNORMAL:
            t = opts.normal_template.format(name=opts.anatomy_names.get(a, a.replace("_", " ")))
            st = STATUS_NORMAL
        texts.append(t)
        status.append(st)
        has_text.append(bool(t))
    labels = torch.tensor([float(rec.labels.get(d, -1)) for d in opts.diagnoses], dtype=torch.float32)
    gtext = _global_text(rec.report or {}, opts.global_text)
    any_abn = any(s == STATUS_ABNORMAL for s in status) or bool((labels == 1).any())
    return {"case_id": rec.case_id, "present": present, "has_text": torch.tensor(has_text, dtype=torch.bool),
            "status": torch.tensor(status, dtype=torch.long), "texts": texts, "global_text": gtext,
            "global_status": torch.tensor(STATUS_ABNORMAL if any_abn else STATUS_NORMAL), "labels": labels}


def record_to_sample(rec, opts: SampleOptions | CTDataConfig, rng: np.random.Generator | None = None,
                     augment: AugmentConfig | None = None, source_anatomies: Sequence[str] | None = None) -> dict:
    """Turn one :class:`~fvlm.data.shards.CaseRecord` whose arrays are already cut into a model sample
    (table in the module doc), on the CPU, through the sample path of :mod:`fvlm.data.inputs`.

    ``rng`` drives random sentence subsets and augmentation (None: deterministic, no
    augmentation). ``source_anatomies``: the label-map order of ``rec`` (default: the
    order of ``rec.present``).
    """
    if isinstance(opts, CTDataConfig):
        opts = SampleOptions.from_config(opts, opts.anatomies or list(rec.present), opts.diagnoses)
    raw = regions_of(rec, opts, opts.anatomies, list(source_anatomies or rec.present.keys()))
    seed = _aug_seed(augment, rng)
    img = build_inputs([raw], opts, opts.anatomies, augment=augment, aug_seeds=None if seed is None else [seed])
    out = {"case_id": rec.case_id, **{k: v[0] for k, v in img.items()}}
    out.update(_text_fields(rec, opts, rng))
    return out


def _aug_seed(augment: AugmentConfig | None, rng: np.random.Generator | None) -> int | None:
    if augment is not None and augment.enabled and rng is not None:
        return int(rng.integers(2**31 - 1))
    return None


# --------------------------------------------------------------------------- batches


def collate(samples: list[dict]) -> dict:
    """Stack a list of samples into a batch (tensors stacked on dim 0, strings kept as lists)."""
    if not samples:
        raise ValueError("collate: empty list")
    out = {}
    for k, v in samples[0].items():
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(v, torch.Tensor) else vals
    return out


def read_batch(source, case_ids: Sequence[str], opts: SampleOptions, rng: np.random.Generator | None = None,
               augment: AugmentConfig | None = None, source_anatomies: Sequence[str] | None = None) -> dict:
    """Host stage of a batch (a DataLoader worker's whole job): the stored voxels each case needs,
    its sampling plan, and the text fields; the image keys are made by :func:`prepare_batch`."""
    src = list(source_anatomies if source_anatomies is not None else source.anatomies)
    raws, samples, seeds = [], [], []
    for cid in case_ids:
        rec, raw = read_regions(source, cid, opts, opts.anatomies, src)
        raws.append(raw)
        seeds.append(_aug_seed(augment, rng))
        samples.append(_text_fields(rec, opts, rng))
    batch = collate(samples)
    batch[RAW_KEY] = raws
    if seeds and seeds[0] is not None:
        batch["aug_seed"] = torch.tensor(seeds, dtype=torch.long)
    return batch


def prepare_batch(batch: dict, opts: SampleOptions, device=None, augment: AugmentConfig | None = None) -> dict:
    """Device stage of a batch: the image keys from ``batch["raw"]`` (resample, window, masks,
    augmentation) on ``device``; the other tensors moved there. Returns a new dict without ``raw``."""
    from ..devices import to_device

    out = {k: v for k, v in batch.items() if k not in (RAW_KEY, "aug_seed")}
    if device is not None:
        out = to_device(out, device)
    seeds = batch["aug_seed"].tolist() if "aug_seed" in batch else None
    out.update(build_inputs(batch[RAW_KEY], opts, opts.anatomies, device=device, augment=augment, aug_seeds=seeds))
    return out


def make_batch_fn(opts: SampleOptions | dict, device=None) -> Callable[[list], dict]:
    """``records -> batch`` for inference (no augmentation), e.g. from a checkpoint's ``meta["data"]``.

    The function also has ``.load(source, case_ids, source_anatomies=None)``: the batch of those
    cases read from ``source`` the way training reads them (:func:`read_batch` +
    :func:`prepare_batch` on ``device``); evaluation uses it, so it sees the training input.
    """
    if isinstance(opts, dict):
        opts = SampleOptions.from_dict(opts)

    def make_batch(records):
        return collate([record_to_sample(r, opts) for r in records])

    def load(source, case_ids, source_anatomies=None):
        return prepare_batch(read_batch(source, case_ids, opts, source_anatomies=source_anatomies), opts, device)

    make_batch.load = load
    make_batch.opts = opts
    return make_batch


class CTStream(BatchStream):
    """An endless, deterministic stream of training batches for one rank.

    Epoch ``e`` is a permutation of ``case_ids`` seeded by ``(seed, e)``; its first
    ``bpe * batch_size * world`` cases are dealt to ranks in contiguous blocks
    (``bpe`` = batches per epoch per rank; the remainder is dropped). Batch ``b`` of the stream
    (counting over epochs) is therefore fixed by ``(seed, rank, world, b)``, and so are its
    random sentence subsets and augmentations (seeded by ``(seed, rank, b)``). With ``W`` loader
    workers, worker ``w`` builds batches ``start + w, start + w + W, ...`` and the DataLoader's
    in-order round robin returns them in stream order, so resuming at micro-batch ``start``
    reproduces the uninterrupted sequence exactly.

    ``source``: anything with ``get(case_id, anatomies=, volume=, crops=) -> CaseRecord``.
    """

    def __init__(self, source, case_ids: Sequence[str], opts: SampleOptions, batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, start: int = 0, augment: AugmentConfig | None = None,
                 source_anatomies: Sequence[str] | None = None):
        super().__init__()
        self.source, self.ids, self.opts = source, list(case_ids), opts
        self.batch_size, self.rank, self.world, self.seed, self.start = int(batch_size), rank, world, seed, int(start)
        self.augment = augment
        self.source_anatomies = list(source_anatomies) if source_anatomies is not None else None
        self.load_volume, self.load_crops = opts.volume_size is not None, opts.crop_size is not None
        self.batches_per_epoch = len(self.ids) // (self.batch_size * self.world)
        if self.batches_per_epoch == 0:
            raise FvlmError(f"{len(self.ids)} training cases are fewer than one global batch "
                            f"({self.batch_size} x {self.world} ranks); lower data.batch_size")

    def batch_ids(self, b: int) -> list[str]:
        """Case ids of stream batch ``b`` for this rank."""
        epoch, k = divmod(b, self.batches_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = perm[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [self.ids[i] for i in mine[k * self.batch_size:(k + 1) * self.batch_size]]

    def make(self, b: int) -> dict:
        """Host stage of stream batch ``b`` (the image keys are built by :meth:`prepare` on the device)."""
        rng = np.random.default_rng([self.seed, self.rank, b, 7])
        batch = read_batch(self.source, self.batch_ids(b), self.opts, rng, self.augment, self.source_anatomies)
        batch["stream_index"] = torch.tensor(b)
        return batch

    def prepare(self, batch: dict, device=None) -> dict:
        """The model batch of a host batch of this stream, on ``device`` (the trainer's ``prepare_batch``)."""
        return prepare_batch(batch, self.opts, device, self.augment)
