"""Benchmark inputs: a synthetic CT-RATE-sized case and the shipped CTs, as NIfTI files + masks.

The synthetic case is 512 x 512 x 300 voxels at 0.7 x 0.7 x 1.5 mm (CT-RATE's typical chest
scan), made from the shipped example_ct (3 mm) and its TotalSegmentator labels: in-plane at
true scale, centred, air around the body; z stretched to fill 450 mm; Gaussian noise of
12 HU added (upsampled 3 mm data without noise would compress unrealistically well). Real
CT-RATE volumes have more fine texture, so their compressed sizes will be somewhat larger.
Files are cached in ``$FVLM_BENCH_CACHE`` (default ``/tmp/fvlm_bench_cache``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "fvlm" / "samples" / "ct"
CTRATE_SHAPE = (512, 512, 300)
CTRATE_SPACING = (0.7, 0.7, 1.5)


def cache_dir() -> Path:
    d = Path(os.environ.get("FVLM_BENCH_CACHE", "/tmp/fvlm_bench_cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def ctrate_case() -> tuple[str, str]:
    """``(image, mask)`` paths of the synthetic 512 x 512 x 300 case (built once, then cached)."""
    import nibabel as nib

    from fvlm.data.sampling import sample_axes

    d = cache_dir()
    ip, mp = d / "ctrate_512x512x300.nii.gz", d / "ctrate_512x512x300_seg.nii.gz"
    if ip.exists() and mp.exists():
        return str(ip), str(mp)
    img = nib.as_closest_canonical(nib.load(SAMPLES / "example_ct.nii.gz"))
    seg = nib.as_closest_canonical(nib.load(SAMPLES / "example_seg_fast_force_split.nii.gz"))
    a = np.asarray(img.dataobj).astype(np.int16)
    s = np.asarray(seg.dataobj).astype(np.uint8)
    src_sp = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    pos = []
    for ax in range(3):
        n_src, m = a.shape[ax], CTRATE_SHAPE[ax]
        if ax < 2:  # true scale, centred
            c_src, c_dst = (n_src - 1) / 2.0, (m - 1) / 2.0
            pos.append(c_src + (np.arange(m) - c_dst) * CTRATE_SPACING[ax] / src_sp[ax])
        else:       # stretched to fill the 450 mm
            pos.append(np.linspace(0, n_src - 1, m))
    big = sample_axes(a, pos, linear=True, pad=-1024)
    rng = np.random.default_rng(0)
    big += rng.normal(0.0, 12.0, size=big.shape).astype(np.float32)
    big = np.clip(np.rint(big), -1024, 3071).astype(np.int16)
    bigs = sample_axes(s, pos, linear=False, pad=0)
    aff = np.diag([*CTRATE_SPACING, 1.0])
    nib.save(nib.Nifti1Image(big, aff), str(ip))
    nib.save(nib.Nifti1Image(bigs, aff), str(mp))
    return str(ip), str(mp)


def shipped_cases() -> list[tuple[str, str, str]]:
    """``(name, image, mask)`` of the shipped abdominal CTs (3 mm)."""
    return [("example_ct 122x101x112 3mm", str(SAMPLES / "example_ct.nii.gz"),
             str(SAMPLES / "example_seg_fast_force_split.nii.gz")),
            ("example_ct_sm 122x101x30 3mm", str(SAMPLES / "example_ct_sm.nii.gz"),
             str(SAMPLES / "example_seg.nii.gz"))]


def write_copies(root: Path, layout, recs: list, anatomy_set: str) -> Path:
    """``recs`` (one case's record under several ids) as a one-shard directory at ``root``:
    ``shards/000-00000.h5``, its index and ``dataset.json`` -> the shard file."""
    from fvlm.data.shards import write_dataset_info, write_index, write_shard

    shard = "shards/000-00000.h5"
    write_shard(root / shard, layout, recs, n=len(recs))
    write_index(root / "index.jsonl", [{"case_id": r.case_id, "patient_id": r.patient_id, "split": "train",
                                        "shard": shard, "row": i,
                                        "anatomies": [a for a in layout.anatomies if r.present[a]]}
                                       for i, r in enumerate(recs)])
    write_dataset_info(root, layout, {"anatomy_set": anatomy_set})
    return root / shard
