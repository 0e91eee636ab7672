"""Generate the demo corpus: CT volumes with inserted findings, masks, reports and ground truth.

``generate_corpus(out_dir, n_cases, seed, preset)`` writes (layout in docs/FORMATS.md,
"Demo corpus")::

    images/<case>.nii.gz    int16 HU, RAS, 3 mm
    masks/<case>.nii.gz     uint8 TotalSegmentator v2 ids (precomputed anatomy masks)
    lesions/<case>.nii.gz   uint8 lesion id (line order of that case's ground-truth findings)
    manifest.csv            what `fvlm preprocess` reads (no labels)
    ground_truth/labels.csv, ground_truth/findings.jsonl   kept apart from the pipeline
    config.yaml             the resolved generator config

Cases and patients: one volume per case, from one of two real sources with different
fields of view (``abdomen``: lung bases to pelvis; ``chest``: heart and thoracic aorta).
A patient has an abdominal study, a chest study, or both; stitching the two sources
into one volume would join two different people at a seam, so they stay separate and
anatomies outside a case's view are simply absent from its mask. Findings are drawn per
patient and appear in every study whose field of view holds their anatomy (focal
findings are placed per study: the two sources are different bodies). Splits are by
patient. Every case is generated from its own seeded stream, so the corpus is
deterministic for a seed and a case does not change when another one does.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import build, dump_config, opt, read_yaml
from ..errors import FvlmError
from ..progress import progress as pbar
from ..resources import config_path
from .findings import FINDINGS, Case
from .reports import write_report
from .templates import ANATOMY_IDS, SPACING_MM, Template, load_templates, vary_template

STAGE_ORDER = sorted(FINDINGS, key=lambda f: FINDINGS[f].stage)


@dataclass
class FindingSpec:
    prevalence: float = opt(0.15, "fraction of the patients whose studies can show it that get it "
                                  "(drawn per split, at least one per split when > 0)")
    size: list[float] = opt([0.0, 0.0], "(low, high) size range; unit per finding (mm, scale, % lung) "
                                        "as documented in fvlm/demo/findings.py")
    hu: list[float] = opt([0.0, 0.0], "(low, high) HU range (absolute, or a change for hepatic_steatosis)")


def _default_findings() -> dict:
    return {k: FindingSpec(0.15, list(f.size), list(f.hu)) for k, f in FINDINGS.items()}


@dataclass
class DemoCorpusConfig:
    n_cases: int = opt(200, "number of volumes (cases) to write")
    seed: int = opt(0, "random seed; the same seed gives the same corpus")
    variant_seed: int | None = opt(None, "seed of the anatomy variants (null = seed): an evaluation corpus drawn "
                                         "with another seed keeps the training corpus's variants")
    id_prefix: str = opt("demo", "prefix of patient ids (demo0001, ...); case ids add the study")
    study_mix: dict[str, float] = opt({"both": 0.4, "abdomen": 0.35, "chest": 0.25},
                                      "chance that a patient has both studies, only the abdominal, only the chest")
    splits: dict[str, float] = opt({"train": 0.6, "val": 0.1, "test": 0.3}, "fraction of cases per split (by patient)")
    healthy_fraction: float = opt(0.25, "fraction of patients with no finding at all")
    n_variants: int = opt(4, "anatomy variants per source (small rotation and scaling), made once per run")
    max_rotation_deg: float = opt(4.0, "largest rotation of a variant, degrees")
    max_scale: float = opt(0.05, "largest relative size change of a variant")
    crop_max_mm: float = opt(18.0, "largest field-of-view crop per side in x and y, mm")
    crop_bottom_max_mm: float = opt(60.0, "largest crop from the inferior end (abdomen: pelvis), mm")
    noise_hu: list[float] = opt([3.0, 8.0], "(low, high) standard deviation of added image noise, HU")
    organ_hu_jitter: float = opt(4.0, "standard deviation of per-organ attenuation offsets, HU")
    p_omit: float = opt(0.2, "chance that a report leaves out an anatomy without findings")
    findings: dict[str, FindingSpec] = opt(_default_findings(), "per-finding prevalence, size and HU ranges")


def load_preset(preset: str | Path = "default") -> DemoCorpusConfig:
    """A preset name under ``configs/demo/`` (``default``, ``quick``) or a YAML path."""
    p = Path(preset)
    if not p.is_file():
        p = config_path(f"demo/{preset}")
    return build(DemoCorpusConfig, read_yaml(p))


def _validate(cfg: DemoCorpusConfig) -> None:
    unknown = sorted(set(cfg.findings) - set(FINDINGS))
    if unknown:
        raise FvlmError(f"unknown demo finding(s) {', '.join(unknown)}; known: {', '.join(FINDINGS)}")
    if not cfg.id_prefix.isalnum():
        raise FvlmError(f"id_prefix must be letters and digits (it names files), got {cfg.id_prefix!r}")
    if cfg.n_cases < 1:
        raise FvlmError(f"n_cases must be at least 1, got {cfg.n_cases}")
    if set(cfg.splits) - {"train", "val", "test"} or not cfg.splits or min(cfg.splits.values()) < 0:
        raise FvlmError(f"splits must map train/val/test to fractions >= 0, got {cfg.splits}")
    if set(cfg.study_mix) - {"both", "abdomen", "chest"} or sum(cfg.study_mix.values()) <= 0:
        raise FvlmError(f"study_mix must weight both/abdomen/chest, got {cfg.study_mix}")
    for k, spec in cfg.findings.items():
        if not 0 <= spec.prevalence <= 1 or len(spec.size) != 2 or len(spec.hu) != 2:
            raise FvlmError(f"finding {k}: prevalence must be in [0, 1] and size/hu (low, high) pairs")


# --------------------------------------------------------------------------- cohort


def _cohort(cfg: DemoCorpusConfig, rng: np.random.Generator) -> list[dict]:
    """Patients with their studies, split and conditions; returns the case list."""
    mix = {k: v for k, v in cfg.study_mix.items() if v > 0}
    kinds, w = list(mix), np.array(list(mix.values()), float)
    patients, n = [], 0
    while n < cfg.n_cases:
        kind = kinds[rng.choice(len(kinds), p=w / w.sum())]
        studies = ["abdomen", "chest"] if kind == "both" else [kind]
        studies = studies[: cfg.n_cases - n]
        patients.append({"patient_id": f"{cfg.id_prefix}{len(patients) + 1:04d}", "studies": studies})
        n += len(studies)
    # splits by patient, filled to the case fractions
    order = rng.permutation(len(patients))
    names = [s for s in ("train", "val", "test") if cfg.splits.get(s, 0) > 0]
    frac = np.array([cfg.splits[s] for s in names], float)
    target = np.cumsum(frac / frac.sum()) * cfg.n_cases
    done = 0
    for i in order:
        k = int(np.searchsorted(target, done, side="right"))
        patients[i]["split"] = names[min(k, len(names) - 1)]
        done += len(patients[i]["studies"])
    # conditions per split: exact counts, so every split has positives of every finding
    for p in patients:
        p["conditions"] = []
    for split in names:
        members = [p for p in patients if p["split"] == split]
        n_healthy = int(round(cfg.healthy_fraction * len(members)))
        healthy = {id(members[i]) for i in rng.permutation(len(members))[:n_healthy]}
        for fid in STAGE_ORDER:
            spec = cfg.findings.get(fid)
            if spec is None or spec.prevalence <= 0:
                continue
            eligible = [p for p in members if set(p["studies"]) & set(FINDINGS[fid].regions)]
            pool = [p for p in eligible if id(p) not in healthy]
            k = min(len(pool), max(1, int(round(spec.prevalence * len(eligible)))))
            for j in rng.permutation(len(pool))[:k]:
                pool[j]["conditions"].append(fid)
    cases = []
    for p in patients:
        for region in p["studies"]:
            cases.append({"index": len(cases), "case_id": f"{p['patient_id']}_{region}", "patient_id": p["patient_id"],
                          "split": p["split"], "region": region, "conditions": list(p["conditions"])})
    return cases


# --------------------------------------------------------------------------- one case


def _crop(t: Template, rng: np.random.Generator, cfg: DemoCorpusConfig):
    xy = int(cfg.crop_max_mm / SPACING_MM)
    bottom = int(cfg.crop_bottom_max_mm / SPACING_MM) if t.region == "abdomen" else 4
    top = 1 if t.region == "abdomen" else 2  # the abdominal lung bases sit in the top slices
    lo = [int(rng.integers(0, xy + 1)), int(rng.integers(0, xy + 1)), int(rng.integers(0, bottom + 1))]
    hi = [int(rng.integers(0, xy + 1)), int(rng.integers(0, xy + 1)), int(rng.integers(0, top + 1))]
    sl = tuple(slice(a, s - b) for a, b, s in zip(lo, hi, t.hu.shape))
    return sl, lo


def make_case(case: dict, variants: dict, cfg: DemoCorpusConfig, seed: int):
    """Build one case; returns (hu int16, labels uint8, lesions uint8, affine, records, report)."""
    rng = np.random.default_rng([seed, case["index"]])
    vs = variants[case["region"]]
    t = vs[int(rng.integers(len(vs)))]
    sl, lo = _crop(t, rng, cfg)
    c = Case(case["region"], t.hu[sl].astype(np.float32), t.labels[sl].copy(),
             np.zeros(t.hu[sl].shape, np.uint8), SPACING_MM)
    # scanner and patient variation: global and per-organ attenuation offsets
    c.hu += rng.normal(0, 3)
    for anat in ("liver", "spleen", "kidney"):
        m = c.mask(anat)
        c.hu[m] += rng.normal(5 if anat == "liver" else 0, cfg.organ_hu_jitter)
    for fid in STAGE_ORDER:
        f = FINDINGS[fid]
        if fid not in case["conditions"] or case["region"] not in f.regions or not c.has(f.anatomy):
            continue
        spec = cfg.findings[fid]
        f.insert(c, rng, tuple(spec.size), tuple(spec.hu))
    c.hu += rng.normal(0, rng.uniform(*cfg.noise_hu), c.hu.shape).astype(np.float32)
    hu = np.clip(np.round(c.hu), -1024, 3071).astype(np.int16)
    affine = np.diag([SPACING_MM] * 3 + [1.0])
    affine[:3, 3] = t.origin + np.array(lo) * SPACING_MM
    in_view = [a for a in ANATOMY_IDS if c.has(a)]
    report = write_report(case["region"], in_view, c.records, rng, cfg.p_omit)
    return hu, c.labels, c.lesions, affine, c.records, report, in_view


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


# --------------------------------------------------------------------------- corpus


def make_variants(cfg: DemoCorpusConfig, templates: dict[str, Template]) -> dict[str, list[Template]]:
    """Per region: the template and ``n_variants - 1`` rotated/scaled copies, drawn from
    ``variant_seed`` (or ``seed``): corpora with the same variant seed share their anatomies."""
    vseed = cfg.seed if cfg.variant_seed is None else cfg.variant_seed
    variants = {}
    for region, t in templates.items():
        vrng = np.random.default_rng([vseed, 7, 0 if region == "abdomen" else 1])
        variants[region] = [t] + [vary_template(t, vrng, cfg.max_rotation_deg, cfg.max_scale)
                                  for _ in range(max(cfg.n_variants, 1) - 1)]
    return variants


def generate_corpus(out_dir: str | Path, n_cases: int | None = None, seed: int | None = None,
                    preset: str | Path = "default", config: DemoCorpusConfig | None = None) -> dict:
    """Write the demo corpus to ``out_dir`` and return a summary.

    Args:
        out_dir: output folder (created; existing demo files are overwritten).
        n_cases: number of volumes; None keeps the preset's.
        seed: random seed; None keeps the preset's.
        preset: ``"default"``, ``"quick"`` or a YAML path (ignored when ``config`` is given).
        config: a ready :class:`DemoCorpusConfig`.
    Returns:
        dict with ``out_dir``, ``manifest``, ``labels``, ``findings``, ``n_cases``,
        ``n_patients``, ``splits`` (cases per split), ``positives`` (cases per finding),
        ``seconds``.
    """
    t0 = time.time()
    cfg = config if config is not None else load_preset(preset)
    if n_cases is not None:
        cfg.n_cases = int(n_cases)
    if seed is not None:
        cfg.seed = int(seed)
    _validate(cfg)
    out = Path(out_dir)
    for sub in ("images", "masks", "lesions", "ground_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(cfg.seed)
    cases = _cohort(cfg, rng)
    variants = make_variants(cfg, load_templates())

    diag_ids = [f for f in FINDINGS if f in cfg.findings and cfg.findings[f].prevalence > 0]
    rows, label_rows, gt_lines = [], [], []
    positives = {f: 0 for f in diag_ids}

    for case in pbar(cases, desc="demo cases", unit="case"):
        hu, labels, lesions, affine, records, report, in_view = make_case(case, variants, cfg, cfg.seed)
        cid = case["case_id"]
        _save(hu, affine, out / "images" / f"{cid}.nii.gz")
        _save(labels, affine, out / "masks" / f"{cid}.nii.gz")
        _save(lesions, affine, out / "lesions" / f"{cid}.nii.gz")
        rows.append({"case_id": cid, "patient_id": case["patient_id"], "split": case["split"],
                     "image": f"images/{cid}.nii.gz", "mask": f"masks/{cid}.nii.gz",
                     "findings": report.findings, "impressions": report.impressions})
        found = {r["finding"] for r in records}
        lab = {"case_id": cid, "patient_id": case["patient_id"], "split": case["split"],
               "region": case["region"], "anatomies_in_view": ";".join(in_view)}
        for f in diag_ids:
            lab[f] = int(f in found)
            positives[f] += int(f in found)
        label_rows.append(lab)
        gt_lines.append({"case_id": cid, "patient_id": case["patient_id"], "split": case["split"],
                         "region": case["region"], "shape": list(hu.shape), "spacing_mm": [SPACING_MM] * 3,
                         "anatomies_in_view": in_view, "findings": records,
                         "report_statements": [{"text": s.text, "section": s.section, "anatomy": s.anatomy,
                                                "diagnoses": list(s.diagnoses), "positive": s.positive}
                                               for s in report.statements]})

    _write_csv(out / "manifest.csv", rows, ["case_id", "patient_id", "split", "image", "mask",
                                            "findings", "impressions"])
    _write_csv(out / "ground_truth" / "labels.csv", label_rows,
               ["case_id", "patient_id", "split", "region", "anatomies_in_view"] + diag_ids)
    with open(out / "ground_truth" / "findings.jsonl", "w", encoding="utf-8") as fh:
        for line in gt_lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    dump_config(cfg, out / "config.yaml")
    splits = {}
    for r in rows:
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    return {"out_dir": str(out), "manifest": str(out / "manifest.csv"),
            "labels": str(out / "ground_truth" / "labels.csv"),
            "findings": str(out / "ground_truth" / "findings.jsonl"),
            "n_cases": len(rows), "n_patients": len({r["patient_id"] for r in rows}),
            "splits": splits, "positives": positives, "seconds": round(time.time() - t0, 2)}


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
