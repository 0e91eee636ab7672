"""Typed config of ``fvlm preprocess`` (defaults in ``configs/preprocess/default.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fvlm.config import opt

__all__ = ["PreprocessConfig", "HUConfig", "MaskConfig", "CropConfig", "WholeConfig", "ShardConfig",
           "ReportConfig", "QCConfig", "CTRateConfig"]


@dataclass
class HUConfig:
    policy: str = opt("apply_metadata",
                      "what to do when intensities do not look like HU: apply_metadata (apply the "
                      "rescale from the manifest/metadata CSV only if the data look raw, then re-check; "
                      "fail otherwise), correct (also undo a detected +-1024 offset without metadata), "
                      "fail (fail the case), off (no check)",
                      choices=("apply_metadata", "correct", "fail", "off"))
    air_range: list[float] = opt([-1250.0, -750.0], "accepted HU of the air level (low 1st percentile after "
                                 "removing padding)")
    tissue_range: list[float] = opt([-200.0, 200.0], "accepted HU of the soft-tissue histogram mode")
    subsample: int = opt(4, "HU statistics use every n-th voxel along each axis (speed)")
    clip: list[int] = opt([-1024, 3071], "HU are clipped to this range before storing as int16")


@dataclass
class MaskConfig:
    source: str = opt("auto", "anatomy masks: auto (the manifest's precomputed mask when it gives one, else "
                      "TotalSegmentator when its weights are local, else a per-case error), totalsegmentator, "
                      "precomputed, none (whole volume only, every anatomy absent)",
                      choices=("auto", "totalsegmentator", "precomputed", "none"))
    class_map: str = opt("v2", "TotalSegmentator class-map version of the masks (v2: 117 classes, v1: 104)",
                         choices=("v2", "v1"))
    ts_task: str = opt("total", "TotalSegmentator task")
    ts_fast: bool = opt(False, "TotalSegmentator --fast (3 mm model)")
    ts_device: str = opt("gpu", "TotalSegmentator device (gpu, cpu, mps)")
    min_voxels: int = opt(10, "an anatomy with fewer mask voxels (at target spacing) is recorded absent")
    grid_tolerance_mm: float = opt(1.0, "a precomputed mask must lie on the image grid within this distance")
    dir: str | None = opt(None, "folder of TotalSegmentator label maps named by case id / VolumeName "
                          "(<name>.nii.gz multilabel, or <name>/<class>.nii.gz); --masks DIR")


@dataclass
class CropConfig:
    oversize: str = opt("resize", "when box + margin exceeds crop_shape: resize (scale the window down "
                        "isotropically) or clip (keep native spacing, cut the centred window)",
                        choices=("resize", "clip"))
    shapes: dict[str, list[int]] = opt({}, "per-anatomy crop_shape overrides {anatomy: [x, y, z]}")
    shape_all: list[int] | None = opt(None, "one crop_shape [x, y, z] for every anatomy (overrides the set)")
    margin_mm: float | None = opt(None, "margin override for every anatomy (mm); null = the set's margin_mm")


@dataclass
class WholeConfig:
    enabled: bool = opt(True, "store the whole volume + anatomy label map")
    shape: list[int] = opt([384, 384, 128], "whole-volume shape [X, Y, Z] (centre pad/crop)")
    spacing_mm: list[float] | None = opt(None, "whole-volume spacing; null = target_spacing_mm")


@dataclass
class ShardConfig:
    samples_per_shard: int = opt(32, "cases per HDF5 shard")
    compression: str = opt("blosc2-zstd", "HDF5 filter of the volume and label map (measured table: "
                           "docs/FORMATS.md §2, benchmarks/codec_bench.py); blosc2-*, zstd, lz4 need "
                           "hdf5plugin imported to read",
                           choices=("blosc2-zstd", "blosc2-lz4", "gzip", "lzf", "zstd", "lz4", "none"))
    compression_level: int = opt(1, "codec level (gzip 1-9, blosc2 0-9, zstd 1-22)")
    shuffle: str = opt("bit", "shuffle before compressing: bit (blosc2 only), byte, none",
                       choices=("bit", "byte", "none"))
    chunk_shape: list[int] = opt([64, 64, 32], "HDF5 chunk [x, y, z] of stored volumes: a crop read "
                                 "decompresses the chunks it touches")


@dataclass
class ReportConfig:
    labeler: bool = opt(True, "run preprocess.reports.ReportLabeler when importable (silver labels)")
    taxonomy: str = opt("fvlm54", "diagnosis taxonomy of the report labeler")
    on_error: str = opt("fail", "labeler exception: fail the case or skip (store no labels)",
                        choices=("fail", "skip"))


@dataclass
class QCConfig:
    num_cases: int = opt(50, "QC montages for this many cases (all when the corpus is smaller)")
    dpi: int = opt(80, "montage resolution")


@dataclass
class CTRateConfig:
    spacing_from: str = opt("auto", "spacing source: auto (metadata CSV when the NIfTI header is blank), "
                            "header, metadata", choices=("auto", "header", "metadata"))
    blank_header_axcodes: str = opt("LPS", "voxel axis codes assumed for a blank header (DICOM order); a "
                                    "blank-header mask gets the same geometry as its image")
    volumes: str = opt("prefer_fixed", "which copy of a CT-RATE volume: prefer_fixed (the v2 *_fixed/ copy "
                       "where it exists, else the v1 original), fixed (v2 only), original (v1 only)",
                       choices=("prefer_fixed", "fixed", "original"))


@dataclass
class PreprocessConfig:
    anatomy_set: str = opt("fvlm15", "anatomy set (configs/anatomy/<name>.yaml or a path)")
    target_spacing_mm: list[float] = opt([1.0, 1.0, 3.0], "crop grid spacing [x, y, z] mm (fVLM: 1 x 1 x 3)")
    orientation: str = opt("RAS", "canonical axis codes of stored arrays (fvlm models assume RAS)")
    max_oblique_deg: float = opt(20.0, "oblique volumes are snapped to the nearest axes up to this angle; "
                                 "beyond it the case fails")
    layout: str = opt("auto", "input layout for --input: auto, folder, ctrate", choices=("auto", "folder", "ctrate"))
    patient_id: str = opt("keep", "manifest patient ids: keep, or hash (sha256 prefix)", choices=("keep", "hash"))
    window: list[float] = opt([-1150.0, 350.0], "default window recorded for readers (HU)")
    max_error_fraction: float = opt(0.5, "exit code 3 when more than this fraction of the part's cases failed "
                                    "(the good ones are still written); a run where no case lands always exits 3")
    hu: HUConfig = field(default_factory=HUConfig, metadata={"help": "HU sanity checks"})
    masks: MaskConfig = field(default_factory=MaskConfig, metadata={"help": "anatomy masks"})
    crop: CropConfig = field(default_factory=CropConfig, metadata={"help": "per-anatomy crops"})
    whole: WholeConfig = field(default_factory=WholeConfig, metadata={"help": "whole volume"})
    shards: ShardConfig = field(default_factory=ShardConfig, metadata={"help": "HDF5 shards"})
    reports: ReportConfig = field(default_factory=ReportConfig, metadata={"help": "report labeler"})
    qc: QCConfig = field(default_factory=QCConfig, metadata={"help": "QC montages"})
    ctrate: CTRateConfig = field(default_factory=CTRateConfig, metadata={"help": "CT-RATE adapter"})

    def __post_init__(self):
        for k in ("target_spacing_mm",):
            v = getattr(self, k)
            if len(v) != 3 or min(v) <= 0:
                raise ValueError(f"{k} must be three positive numbers, got {v}")
        if self.whole.spacing_mm is not None and (len(self.whole.spacing_mm) != 3 or min(self.whole.spacing_mm) <= 0):
            raise ValueError(f"whole.spacing_mm must be three positive numbers, got {self.whole.spacing_mm}")
        if len(self.whole.shape) != 3 or min(self.whole.shape) <= 0:
            raise ValueError(f"whole.shape must be three positive integers, got {self.whole.shape}")
        if self.shards.samples_per_shard < 1:
            raise ValueError("shards.samples_per_shard must be >= 1")
        o = self.orientation.upper()
        if len(o) != 3 or any(len(set(o) & set(pair)) != 1 for pair in ("LR", "AP", "SI")):
            raise ValueError(f"orientation must be 3 axis codes like RAS or LPS, got {self.orientation!r}")
