"""Config schema of ``fvlm zeroshot`` (defaults in ``configs/eval/zeroshot.yaml``).

Kept free of numpy/torch imports so that ``fvlm --help`` and ``fvlm config show
zeroshot`` stay fast.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt

SCORING_RULES = ("pairwise", "mean_embedding", "softmax_all")
PROMPT_STYLES = ("taxonomy", "ctclip")
THRESHOLD_SOURCES = ("split", "train_subset", "none")
THRESHOLD_METHODS = ("youden", "sensitivity")


@dataclass
class SplitsConfig:
    test: str = opt("test", "split the metrics are reported on ('val'/'valid'/'validation' are one name)")
    threshold: str = opt("val", "split thresholds are tuned on when thresholds.source=split")
    train: str = opt("train", "split the linear probe is trained on (and the threshold subset is carved from)")


@dataclass
class ThresholdConfig:
    source: str = opt("split", "where operating thresholds come from: 'split' (splits.threshold), "
                      "'train_subset' (a patient-disjoint subset carved out of splits.train), "
                      "'none' (threshold-free metrics only)", choices=THRESHOLD_SOURCES)
    method: str = opt("youden", "threshold rule on the tuning cases: 'youden' (max sens+spec-1) or "
                      "'sensitivity' (highest threshold reaching target_sensitivity)",
                      choices=THRESHOLD_METHODS)
    target_sensitivity: float = opt(0.9, "target for method=sensitivity")
    train_fraction: float = opt(0.2, "fraction of train patients carved out when source=train_subset")
    seed: int = opt(0, "seed of the patient draw for source=train_subset")

    def __post_init__(self):
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"thresholds.train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"thresholds.target_sensitivity must be in (0, 1], got {self.target_sensitivity}")


@dataclass
class ScoringConfig:
    rule: str = opt("pairwise", "how prompt similarities become a score: 'pairwise' = mean over every "
                    "(positive, negative) prompt pair of softmax([s+, s-] * logit_scale)[+]; "
                    "'mean_embedding' = softmax of the mean positive vs mean negative prompt embedding; "
                    "'softmax_all' = positive share of a softmax over all prompts", choices=SCORING_RULES)
    logit_scale: float | None = opt(None, "multiplier of cosine similarities before the softmax; "
                                    "null = the checkpoint's learned scale (model.logit_scale), else 100")
    prompts: str = opt("taxonomy", "prompt wording: 'taxonomy' (the taxonomy's phrasings) or 'ctclip' "
                       "(CT-CLIP's '<label> is present.' / '<label> is not present.' on CT-RATE names)",
                       choices=PROMPT_STYLES)
    clip_baseline: bool = opt(False, "score every diagnosis on the global embedding (CLIP-style baseline)")


@dataclass
class BootstrapConfig:
    n: int = opt(1000, "bootstrap resamples of test patients (0 = no confidence intervals)")
    seed: int = opt(0, "RNG seed of the bootstrap")
    level: float = opt(0.95, "coverage of the two-sided percentile interval")


@dataclass
class ProbeConfig:
    enabled: bool = opt(True, "train a logistic-regression probe on frozen train embeddings")
    C: float = opt(1.0, "inverse L2 regularisation strength (scikit-learn LogisticRegression C)")
    max_iter: int = opt(2000, "solver iterations")
    class_weight: str | None = opt("balanced", "'balanced' or null")


@dataclass
class RetrievalConfig:
    enabled: bool = opt(True, "image<->text retrieval on the test split (whole reports and per anatomy)")
    ks: list[int] = opt([1, 5, 10], "recall@k cut-offs")
    report_fields: list[str] = opt(["findings", "impressions"], "report fields joined as the whole-report text")


@dataclass
class CacheConfig:
    enabled: bool = opt(True, "reuse case embeddings across runs (keyed by checkpoint and data hash)")
    dir: str | None = opt(None, "cache directory; null = <out>/cache")


@dataclass
class ZeroShotConfig:
    checkpoint: str | None = opt(None, "consolidated checkpoint (.pt) to evaluate")
    data: str | None = opt(None, "shard root written by `fvlm preprocess`")
    taxonomy: str = opt("fvlm54", "diagnosis taxonomy: fvlm54, ctrate18 or a YAML path")
    labels: list[str] = opt([], "ground-truth label files (CSV or JSONL); empty = silver labels from the shards")
    silver_outside_test: bool = opt(True, "with label files: cases of non-test splits missing from them "
                                    "fall back to silver labels (stated in results)")
    out: str | None = opt(None, "output directory")
    protocol: str = opt("fvlm", "protocol name written into the results (e.g. 'fvlm', 'ctrate')")
    splits: SplitsConfig = opt(SplitsConfig(), "which split plays which role")
    thresholds: ThresholdConfig = opt(ThresholdConfig(), "operating thresholds (never tuned on the test split)")
    scoring: ScoringConfig = opt(ScoringConfig(), "prompt scoring")
    min_positives: int = opt(5, "a diagnosis with fewer test positives is listed as skipped")
    min_negatives: int = opt(5, "a diagnosis with fewer test negatives is listed as skipped")
    absent_anatomy: str = opt("exclude", "cases whose anatomy is not in the scan: 'exclude' them from that "
                              "diagnosis, or 'score' them anyway", choices=("exclude", "score"))
    bootstrap: BootstrapConfig = opt(BootstrapConfig(), "confidence intervals")
    probe: ProbeConfig = opt(ProbeConfig(), "linear-probe baseline")
    retrieval: RetrievalConfig = opt(RetrievalConfig(), "retrieval metrics")
    cache: CacheConfig = opt(CacheConfig(), "embedding cache")
    batch_size: int = opt(1, "cases per image forward")
    device: str = opt("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    figures: bool = opt(True, "write ROC curves per anatomy and a summary chart (PNG)")
    max_cases: int | None = opt(None, "evaluate at most this many cases per split (smoke tests)")
