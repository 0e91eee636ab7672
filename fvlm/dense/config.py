"""Config schema of ``fvlm dense`` (defaults in ``configs/dense/default.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import moved_key, opt
from ..errors import ConfigError
from ..engine.config import TrainConfig as EngineTrainConfig
from ..models.dense_config import DenseModelConfig as ModelConfig

__all__ = ["DenseConfig", "ModelConfig", "DataConfig", "TrainConfig", "EvalConfig"]


@dataclass
class DataConfig:
    source: str = opt("samples", "samples: shipped TotalSegmentator CT; shards: `fvlm preprocess` output; "
                                 "demo: `fvlm demo` corpus", choices=("samples", "shards", "demo"))
    root: str | None = opt(None, "shards root or demo corpus directory (unused for samples)")
    anatomy_set: str = opt("fvlm15", "anatomy set naming the segmentation classes")
    classes: list[str] = opt([], "anatomy ids to segment (empty = every anatomy of the set)")
    window: list[float] = opt([-1150.0, 350.0], "HU window mapped to [0, 1]")
    spacing_mm: list[float] = opt([], "resample volumes to this spacing first (empty = keep)")
    train_split: str = opt("train", "shards/demo: split used for training")
    eval_split: str = opt("valid", "shards/demo: split used by `dense eval`")
    holdout: str = opt("slices", "samples: what evaluates. slices: the axial slices holdout_z of example_ct (the rest, "
                                 "minus holdout_gap, trains); patient: the second shipped patient (the contrast "
                                 "DICOM series example_ct_dicom, upper abdomen) while all of example_ct trains",
                       choices=("slices", "patient"))
    holdout_z: list[int] = opt([88, 100], "samples: held-out axial slices [start, stop) (evaluation)")
    holdout_gap: int = opt(4, "samples: slices next to the held-out range left out of training")
    findings: list[str] = opt([], "demo: diagnosis ids whose lesions are grounded and supervised (empty = all)")
    max_cases: int = opt(0, "use at most this many cases per split (0 = all)")
    batch_size: int = opt(2, "crops per micro-batch per process")
    num_workers: int = opt(0, "crop-sampling worker processes (0 = in the training process)")


@dataclass
class TrainConfig(EngineTrainConfig):
    """The shared :class:`~fvlm.engine.config.TrainConfig` (the engine of ``fvlm pretrain``: schedule,
    parameter groups, DeepSpeed, exact resume, checkpoints, metrics.csv/TensorBoard) with dense
    defaults and the dense keys (crop sampling, losses, prompts)."""

    steps: int = opt(300, "optimizer steps")
    batch_size: int | None = opt(None, "deprecated spelling of data.batch_size (read for one release)")
    lr: float = opt(2e-3, "peak AdamW learning rate of the head")
    encoder_lr: float = opt(2e-4, "peak AdamW learning rate of the encoder (when not frozen); sets "
                                  "lr_groups {model.encoder.: encoder_lr / lr} unless lr_groups is given")
    weight_decay: float = opt(1e-4, "AdamW weight decay (not on the parameters the encoder's and heads' "
                                    "no_weight_decay() name)")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    warmup_steps: int = opt(-1, "linear warm-up steps (-1 = steps // 20)")
    min_lr_ratio: float = opt(0.05, "final learning rate as a fraction of the peak (cosine)")
    deepspeed_config: str = opt("deepspeed/zero0.json", "DeepSpeed JSON (path or name under configs/)")
    zero_stage: int | None = opt(0, "DeepSpeed ZeRO stage (0-3); overrides the JSON's")
    ckpt_every: int = opt(0, "save a resumable checkpoint (and dense.pt) every N steps (0 = only at the end)")
    val_every: int = opt(0, "unused: dense training has no validation step (use `fvlm dense eval`)")
    val_metric: str = opt("", "unused: dense training has no validation step")
    loss: str = opt("dice_ce", "seg head loss: Dice + cross-entropy or Dice + focal", choices=("dice_ce", "dice_focal"))
    focal_gamma: float = opt(2.0, "focal loss gamma")
    label_weight: float = opt(0.2, "text head: weight of the image-level label loss")
    foreground_crop: float = opt(0.7, "probability that a crop is centred on a labelled voxel")
    crop_jitter: float = opt(0.25, "the crop centre moves up to this fraction of the crop size away from the chosen "
                                   "voxel; 0.5 lets a target lie anywhere in the crop (no 'target at the centre' prior)")
    intensity_jitter: float = opt(0.0, "each training crop's windowed intensities x become a * x + b, a drawn from "
                                       "[1 - j, 1 + j] and b from [-j, j] (another scanner or contrast phase; 0 = off)")
    crop_sampling: str = opt("foreground", "what a foreground crop is centred on: foreground (a random labelled voxel, "
                                           "so mostly the largest organs) or class_balanced (a class drawn uniformly "
                                           "among the labelled ones, then one of its voxels)",
                             choices=("foreground", "class_balanced"))
    class_weights: str = opt("none", "seg head: cross-entropy class weights: none, or inverse_sqrt "
                                     "(sqrt(background voxels / class voxels) over the training cases, background 1, "
                                     "capped at train.max_class_weight)", choices=("none", "inverse_sqrt"))
    max_class_weight: float = opt(10.0, "seg head: cap of a class weight (class_weights=inverse_sqrt)")
    focal_alpha: float = opt(0.25, "text head: focal-loss weight of positive voxels (negatives get 1 - alpha; "
                                   "-1 = unweighted)")
    finding_negatives: int = opt(0, "text head: extra prompt slots per sample filled with a training finding text of "
                                    "a diagnosis the case is labelled negative for (all-zero target)")
    report_sentences: bool = opt(True, "text head: prompt abnormal report sentences too (known 0 outside their "
                                       "anatomy, unknown inside)")
    prompts_per_step: int = opt(8, "text head: prompts sampled per step (shuffled; tests order invariance)")
    unseen_classes: list[str] = opt([], "text head: classes never prompted in training (zero-shot at eval)")
    seed: int = opt(0, "seed of model init and crop sampling")
    threads: int = opt(2, "torch CPU threads per process")
    device: str = opt("auto", "auto or cuda: the engine trains on the GPU when one is visible; cpu with a "
                              "visible GPU is refused (hide it with CUDA_VISIBLE_DEVICES=)")
    log_every: int = opt(25, "log the loss every N steps")
    num_workers: int | None = opt(None, "deprecated spelling of data.num_workers (read for one release)")

    def __post_init__(self):
        if self.warmup_steps < 0:
            self.warmup_steps = max(1, self.steps // 20)
        if not self.lr_groups and self.lr > 0:
            self.lr_groups = {"model.encoder.": self.encoder_lr / self.lr}
        if self.val_every or self.val_metric:
            raise ConfigError("config keys 'train.val_every' and 'train.val_metric' do nothing in `fvlm dense "
                              "train` (it has no validation step; use `fvlm dense eval`); leave them unset")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class EvalConfig:
    overlap: float = opt(0.25, "sliding-window overlap")
    threshold: float = opt(0.5, "text head: sigmoid threshold for a mask")
    paraphrases: dict[str, str] = opt({}, "text head: class id -> an unseen phrasing used at evaluation")
    tolerance: int = opt(1, "pointing game: voxels of tolerance around the target mask")
    text_control: bool = opt(True, "grounding: also point with a finding text of another anatomy in place of each "
                                   "finding's own (a text-blind model scores the same on both)")
    sw_batch_size: int = opt(2, "sliding-window batch")
    crops: str = opt("whole", "what is scored: whole (whole volumes by sliding windows) or organ (per case and "
                              "finding anatomy, one crop of model.img_size centred on that organ's mask, never on "
                              "the lesion; 3D models, cases with findings; the anatomy Dice is then per crop)",
                     choices=("whole", "organ"))


@dataclass
class DenseConfig:
    model: ModelConfig = opt(ModelConfig(), "encoder and head")
    data: DataConfig = opt(DataConfig(), "where images and masks come from")
    train: TrainConfig = opt(TrainConfig(), "training")
    eval: EvalConfig = opt(EvalConfig(), "evaluation and grounding")

    def __post_init__(self):   # data keys sit under data. in every program
        moved_key(self, "train.batch_size", "data.batch_size")
        moved_key(self, "train.num_workers", "data.num_workers")
