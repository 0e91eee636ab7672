"""Typed config of ``fvlm pretrain-xray`` (defaults in ``configs/xray/default.yaml``).

``train`` is the shared training config of ``fvlm pretrain`` with X-ray additions, so both
programs run on the same engine with the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import moved_key, opt
from ..errors import ConfigError
from ..models.xray_config import XrayModelConfig
from ..engine.config import TrainConfig

__all__ = ["XrayDataConfig", "XrayModelConfig", "XrayMaskConfig", "XrayTrainConfig", "XrayProbeConfig",
           "XrayPretrainConfig"]


@dataclass
class XrayDataConfig:
    source: str = opt("", "folder of PNG/JPEG/DICOM radiographs, or a CSV/JSONL/TXT manifest (column 'image')")
    size: int = opt(224, "square input size in pixels (aspect kept, padded); 224 .. 1280")
    orientation: Literal["manifest", "auto", "none"] = opt(
        "manifest", "rotation to upright: manifest column rotate/rotated_90 (auto-detected when absent), "
                    "always auto-detect, or none")
    normalize: Literal["percentile", "minmax", "none"] = opt("percentile", "contrast normalisation per image")
    contour: Literal["auto", "box", "mask", "none"] = opt(
        "auto", "chest contour: intensity thresholding (or the manifest's mask), central box, mask required, none")
    use_window: bool = opt(True, "apply the DICOM VOI window (WindowCenter/Width) when the file has one")
    cache: str | None = opt(None, "h5 cache (fvlm-xray-cache) read instead of the images; built if missing")
    cache_dtype: Literal["uint8", "uint16"] = opt("uint16", "pixel type in the h5 cache")
    flip: bool = opt(False, "random horizontal flips")
    batch_size: int = opt(8, "images per micro-batch per process")
    num_workers: int = opt(0, "DataLoader worker processes")


@dataclass
class XrayMaskConfig:
    method: Literal["mae", "gmml"] = opt("mae", "mae: hide patches from the encoder; gmml: corrupt blocks, "
                                                "encoder sees all")
    strategy: Literal["random", "context", "box"] = opt(
        "random", "MAE masking: uniform random, context-aware on the chest contour, or context-aware on the "
                  "fixed central box")
    ratio: float = opt(0.75, "mask ratio of the random strategy")
    ratio_inside: float = opt(0.95, "context-aware: mask ratio inside the chest")
    ratio_outside: float = opt(0.85, "context-aware: mask ratio outside the chest")
    region_min_frac: float = opt(0.5, "a patch counts as inside the chest when this fraction of it is")
    box_frac: list[float] = opt([0.7, 0.8], "central box (height, width) as fractions of the image")
    box_center: list[float] = opt([0.45, 0.5], "central box centre (row, col) as fractions")
    gmml_fraction: float = opt(0.5, "GMML: fraction of the patches corrupted")
    gmml_corruption: Literal["noise", "zeros", "swap", "mixed"] = opt(
        "mixed", "GMML: replace blocks by noise, zeros, another image of the batch, or one of those per image")
    gmml_min_block: int = opt(4, "GMML: smallest block, in patches")
    gmml_max_block: float = opt(0.25, "GMML: largest block, as a fraction of the patches")
    norm_pix: bool = opt(True, "MAE: per-patch normalised pixel targets")
    gmml_l1: bool = opt(True, "GMML: L1 (else squared) error on corrupted pixels")


@dataclass
class XrayTrainConfig(TrainConfig):
    """The shared :class:`~fvlm.engine.config.TrainConfig` (the engine of ``fvlm pretrain``) with X-ray
    defaults, the X-ray keys ``out_dir``, ``vis_every``, and the spellings of earlier
    X-ray configs (``min_lr``, ``grad_clip``, ``resume: true/false``, ``deepspeed_config: null``)
    mapped onto the shared keys."""

    lr: float = opt(1.5e-4, "peak learning rate (AdamW)")
    warmup_steps: int = opt(50, "linear warm-up steps")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas")
    lr_groups: dict[str, float] = opt({}, "learning-rate multipliers by parameter-name prefix of the task, "
                                      "e.g. {model.encoder.: 0.5} (decoder: model.decoder_)")
    deepspeed_config: str | None = opt("deepspeed/zero0.json", "DeepSpeed JSON (path or name under configs/); "
                                       "null = deepspeed/zero0.json")
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage (0, 1, 2); overrides the JSON's")
    resume: str | bool = opt("auto", "auto (continue from out_dir's latest checkpoint if any), never, or a "
                             "checkpoint directory; true/false = auto/never")
    val_every: int = opt(0, "unused: pretrain-xray has no validation step (must stay 0)")
    val_metric: str = opt("", "unused: pretrain-xray has no validation step (must stay empty)")
    val_mode: Literal["max", "min"] = opt("max", "unused: pretrain-xray has no validation step")
    out_dir: str = opt("runs/xray", "output folder: logs, PNG grids, checkpoints, encoder.pt, resolved config")
    batch_size: int | None = opt(None, "deprecated spelling of data.batch_size (read for one release)")
    vis_every: int = opt(100, "write a PNG grid (original / model input / reconstruction) every N steps and at "
                              "the end (0 = off)")
    min_lr: float | None = opt(None, "earlier spelling: final learning rate of the cosine schedule in absolute "
                                     "terms; sets min_lr_ratio = min_lr / lr")
    grad_clip: float | None = opt(None, "earlier spelling of clip_grad")

    def __post_init__(self):
        if self.min_lr is not None:
            self.min_lr_ratio = self.min_lr / self.lr if self.lr > 0 else 0.0
            self.min_lr = None
        if self.grad_clip is not None:
            self.clip_grad, self.grad_clip = self.grad_clip, None
        if isinstance(self.resume, bool):
            self.resume = "auto" if self.resume else "never"
        if self.deepspeed_config is None:
            self.deepspeed_config = "deepspeed/zero0.json"
        if self.val_every or self.val_metric:
            raise ConfigError("config keys 'train.val_every' and 'train.val_metric' do nothing in pretrain-xray "
                              "(it has no validation step); leave them unset")


@dataclass
class XrayProbeConfig:
    labels: str | None = opt(None, "CSV of labelled images for a frozen-feature linear probe after training")
    label_column: str = opt("finding_labels", "column with '|'-separated findings (NIH style); "
                                              "or 'columns' for one 0/1 column per label")
    min_positives: int = opt(2, "probe only labels with at least this many positives and negatives")
    folds: int = opt(0, "cross-validation folds (0 = leave-one-out)")
    pool: Literal["mean", "cls"] = opt("mean", "feature readout: mean of patch tokens or the class token")


@dataclass
class XrayPretrainConfig:
    data: XrayDataConfig = opt(XrayDataConfig(), "radiographs")
    model: XrayModelConfig = opt(XrayModelConfig(), "encoder and MAE decoder")
    mask: XrayMaskConfig = opt(XrayMaskConfig(), "masking strategy and loss")
    train: XrayTrainConfig = opt(XrayTrainConfig(), "optimisation, precision, DeepSpeed, logging, checkpoints "
                                                    "(the shared engine of fvlm pretrain)")
    probe: XrayProbeConfig = opt(XrayProbeConfig(), "linear probe on frozen features")

    def __post_init__(self):
        moved_key(self, "train.batch_size", "data.batch_size")   # data keys sit under data. in every program
        d, m, k, t = self.data, self.model, self.mask, self.train
        if not 32 <= d.size <= 4096:
            raise ConfigError(f"config key 'data.size' must be in 32..4096, got {d.size}")
        if m.patch_size < 2 or d.size % m.patch_size:
            raise ConfigError(f"config key 'data.size' ({d.size}) must be divisible by 'model.patch_size' "
                              f"({m.patch_size})")
        for key in ("ratio", "ratio_inside", "ratio_outside"):
            v = getattr(k, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"config key 'mask.{key}' must be in [0, 1), got {v}")
        if not 0.0 < k.gmml_fraction < 1.0:
            raise ConfigError(f"config key 'mask.gmml_fraction' must be in (0, 1), got {k.gmml_fraction}")
        if len(k.box_frac) != 2 or len(k.box_center) != 2:
            raise ConfigError("config keys 'mask.box_frac' and 'mask.box_center' need two values (row, col)")
        if t.zero_stage not in (0, 1, 2):
            raise ConfigError(f"config key 'train.zero_stage' must be 0, 1 or 2, got {t.zero_stage}")
        if t.steps < 1 or d.batch_size < 1 or t.grad_accum < 1:
            raise ConfigError("config keys 'train.steps', 'data.batch_size' and 'train.grad_accum' must be >= 1")
