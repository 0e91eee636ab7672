"""Config schema of ``fvlm dense`` (defaults in ``configs/dense/default.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
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
    holdout_z: list[int] = opt([88, 100], "samples: held-out axial slices [start, stop) (evaluation)")
    holdout_gap: int = opt(4, "samples: slices next to the held-out range left out of training")
    findings: list[str] = opt([], "demo: diagnosis ids whose lesions are grounded and supervised (empty = all)")
    max_cases: int = opt(0, "use at most this many cases per split (0 = all)")


@dataclass
class TrainConfig:
    steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(2, "crops per step")
    lr: float = opt(2e-3, "AdamW learning rate of the head")
    encoder_lr: float = opt(2e-4, "AdamW learning rate of the encoder (when not frozen)")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    loss: str = opt("dice_ce", "seg head loss: Dice + cross-entropy or Dice + focal", choices=("dice_ce", "dice_focal"))
    focal_gamma: float = opt(2.0, "focal loss gamma")
    label_weight: float = opt(0.2, "text head: weight of the image-level label loss")
    foreground_crop: float = opt(0.7, "probability that a crop is centred on a labelled voxel")
    crop_jitter: float = opt(0.25, "the crop centre moves up to this fraction of the crop size away from the chosen "
                                   "voxel; 0.5 lets a target lie anywhere in the crop (no 'target at the centre' prior)")
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
    seed: int = opt(0, "random seed")
    threads: int = opt(2, "torch CPU threads")
    device: str = opt("auto", "cpu, cuda or auto")
    log_every: int = opt(25, "log the loss every N steps")


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
