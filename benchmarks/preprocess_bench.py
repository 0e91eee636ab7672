"""Benchmark of `fvlm preprocess` against a plain MONAI pipeline and a load+resample floor.

    python benchmarks/preprocess_bench.py [--quick] [--repeats 2] [--out DIR]

Per volume, each method runs in a fresh subprocess (so peak RSS is its own), timed over the
same steps from the file on disk to crops in memory:

  (a) fvlm: preprocess.case.process_case (load, HU check, RAS, resample 1x1x3 linear/nearest,
      15 anatomy crops, whole volume), shard writing timed separately;
  (b) MONAI: Compose(LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged)
      + per-anatomy SpatialCrop/ResizeWithPadOrCrop to the same crop shapes;
  (c) floor: nibabel load + one torch trilinear resample to the target grid.

Peak RSS is reported as the increase over the process's RSS after imports, next to the size of
the volume as float32. Then shard random-read throughput (crops/s) and a compression table.
Volumes: the shipped samples and a synthetic 512x512x300 int16 CT (example_ct upsampled).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- one measurement (child)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: current, VmHWM: peak) in MB; 0 where unavailable."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _reset_peak() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(method: str, image: str, mask: str) -> dict:
    import nibabel as nib  # noqa: F401
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from fvlm.anatomy import load_anatomy_set
    from preprocess.case import crop_shapes
    from preprocess.config import PreprocessConfig

    cfg = PreprocessConfig()
    cfg.reports.labeler = False
    aset = load_anatomy_set(cfg.anatomy_set)
    shapes = crop_shapes(cfg, aset)
    # import costs stay outside the timing (every method pays them once per process)
    import h5py  # noqa: F401
    import monai.transforms as mt
    import scipy.ndimage  # noqa: F401
    import SimpleITK  # noqa: F401
    from preprocess.case import process_case
    from preprocess.inputs import CaseSpec

    base = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    extra = {}
    if method == "fvlm":
        rec = process_case(CaseSpec(case_id="b", image=image, mask=mask), cfg, aset)
        t1 = time.perf_counter()
        from fvlm.data.shards import write_shard
        from preprocess.pipeline import build_layout

        with tempfile.TemporaryDirectory() as d:
            write_shard(Path(d) / "s.h5", build_layout(cfg, aset), [rec], n=1)
            extra["write_s"] = time.perf_counter() - t1
            extra["shard_mb"] = (Path(d) / "s.h5").stat().st_size / 2**20
        n_crops = len(rec.crops)
        t_end = t1
    elif method == "monai":
        tsp = tuple(cfg.target_spacing_mm)
        pipe = mt.Compose([
            mt.LoadImaged(keys=["img", "seg"], image_only=True),
            mt.EnsureChannelFirstd(keys=["img", "seg"]),
            mt.Orientationd(keys=["img", "seg"], axcodes="RAS"),
            mt.Spacingd(keys=["img", "seg"], pixdim=tsp, mode=("bilinear", "nearest")),
            mt.ScaleIntensityRanged(keys="img", a_min=-1150, a_max=350, b_min=0.0, b_max=1.0, clip=True),
        ])
        d = pipe({"img": image, "seg": mask})
        lut = torch.from_numpy(aset.lookup("v2").astype(np.int64))
        lab = lut[d["seg"][0].long()]
        n_crops = 0
        for k, a in enumerate(aset, start=1):
            m = lab == k
            if int(m.sum()) < 10:
                continue
            idx = torch.nonzero(m)
            lo, hi = idx.min(0).values, idx.max(0).values + 1
            margin = torch.tensor([int(round(a.margin_mm / s)) for s in tsp])
            roi_s, roi_e = (lo - margin).clamp(min=0), hi + margin
            crop = mt.SpatialCrop(roi_start=roi_s.tolist(), roi_end=roi_e.tolist())(d["img"])
            crop = mt.ResizeWithPadOrCrop(spatial_size=shapes[a.id])(crop)
            n_crops += 1
        t_end = time.perf_counter()
    elif method == "floor":
        import nibabel as nib

        img = nib.load(image)
        arr = np.asanyarray(img.dataobj)
        sp = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
        tsp = np.asarray(cfg.target_spacing_mm)
        size = [int(round((n - 1) * s / t + 1)) for n, s, t in zip(arr.shape, sp, tsp)]
        out = torch.nn.functional.interpolate(torch.from_numpy(arr)[None, None].float(), size=size,
                                              mode="trilinear", align_corners=True)
        n_crops = 0
        t_end = time.perf_counter()
        del out
    else:
        raise SystemExit(f"unknown method {method}")
    return {"seconds": t_end - t0, "peak_mb": _peak_mb() - base, "crops": n_crops, **extra}


# --------------------------------------------------------------------------- driver


def run_child(method, image, mask, threads) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, __file__, "--child", method, image, mask], capture_output=True, text=True,
                       env=env, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"{method} on {image} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_synthetic(d: Path, samples: Path) -> tuple[str, str, tuple]:
    """example_ct (3 mm, 122x101x112) upsampled to 512x512x300 int16, with its full-volume mask."""
    import nibabel as nib
    from preprocess.geometry import sample_axes

    img = nib.load(samples / "example_ct.nii.gz")
    seg = nib.load(samples / "example_seg_fast_force_split.nii.gz")
    a = np.asarray(img.dataobj).astype(np.int16)
    s = np.asarray(seg.dataobj).astype(np.uint8)
    shape = (512, 512, 300)
    pos = [np.linspace(0, n - 1, m) for n, m in zip(a.shape, shape)]
    big = sample_axes(a, pos, linear=True, out_dtype=np.int16)
    bigs = sample_axes(s, pos, linear=False)
    sp = [3.0 * (n - 1) / (m - 1) for n, m in zip(a.shape, shape)]
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = img.affine[:3, 3]
    ip, mp = d / "synthetic_512x512x300.nii.gz", d / "synthetic_seg.nii.gz"
    nib.save(nib.Nifti1Image(big, aff), str(ip))
    nib.save(nib.Nifti1Image(bigs, aff), str(mp))
    return str(ip), str(mp), shape


def read_throughput(tmp: Path, small: bool, compression: str | None, level: int = 1, n_cases: int = 16,
                    reads: int = 300) -> dict:
    """Write a shard of random-but-CT-like crops, then read random (case, anatomy) crops."""
    import h5py  # noqa: F401
    from fvlm.anatomy import load_anatomy_set
    from fvlm.config import load_config
    from fvlm.data import CaseRecord, ShardDataset, ShardLayout
    from fvlm.data.shards import write_dataset_info, write_index, write_shard
    from preprocess.case import crop_shapes
    from preprocess.config import PreprocessConfig

    cfg = load_config(PreprocessConfig, files=["preprocess/small"] if small else [], base="preprocess/default")
    aset = load_anatomy_set(cfg.anatomy_set)
    shapes = crop_shapes(cfg, aset)
    layout = ShardLayout(anatomies=aset.ids, crop_shapes=shapes, whole_shape=None, compression=compression,
                         compression_level=level)
    rng = np.random.default_rng(0)

    def recs():
        for i in range(n_cases):
            crops, masks = {}, {}
            for a, s in shapes.items():
                # smooth "anatomy" + noise: compresses like CT, unlike white noise
                base = np.cumsum(rng.integers(-3, 4, size=s, dtype=np.int16), axis=2).astype(np.int16)
                crops[a] = (base + rng.integers(-20, 20, size=s)).astype(np.int16)
                m = np.zeros(s, np.uint8)
                m[s[0] // 4: 3 * s[0] // 4, s[1] // 4: 3 * s[1] // 4, s[2] // 4: 3 * s[2] // 4] = 1
                masks[a] = m
            yield CaseRecord(case_id=f"c{i}", crops=crops, crop_masks=masks, present={a: True for a in shapes},
                             bbox={a: (0, 0, 0, 1, 1, 1) for a in shapes})

    root = tmp / f"rt_{'small' if small else 'default'}_{compression}{level}"
    t0 = time.perf_counter()
    write_shard(root / "shards/000-00000.h5", layout, recs(), n=n_cases)
    t_write = time.perf_counter() - t0
    write_index(root / "index.jsonl", [{"case_id": f"c{i}", "split": "", "patient_id": "", "row": i,
                                        "shard": "shards/000-00000.h5", "anatomies": aset.ids}
                                       for i in range(n_cases)])
    write_dataset_info(root, layout)
    ds = ShardDataset(root)
    pairs = [(f"c{rng.integers(n_cases)}", aset.ids[rng.integers(len(aset))]) for _ in range(reads)]
    ds.crop(*pairs[0])
    t0 = time.perf_counter()
    vox = 0
    for cid, a in pairs:
        c, m, _ = ds.crop(cid, a)
        vox += c.size
    dt = time.perf_counter() - t0
    size = (root / "shards/000-00000.h5").stat().st_size / 2**20
    return {"shapes": "small" if small else "default", "compression": f"{compression or 'none'}"
            + (f"-{level}" if compression == "gzip" else ""), "crops_per_s": reads / dt,
            "mean_crop_kvox": vox / reads / 1e3, "write_s": t_write, "shard_mb": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "IMAGE", "MASK"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="skip the synthetic 512x512x300 volume")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method and volume (best time kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    samples = ROOT / "fvlm" / "samples" / "ct"
    tmp = Path(tempfile.mkdtemp(prefix="fvlm_bench_"))
    ao = tmp / "aorta_ts.nii.gz"
    import nibabel as nib

    m = nib.load(samples / "aorta_report" / "aorta.nii.gz")
    nib.save(nib.Nifti1Image((np.asarray(m.dataobj) > 0).astype(np.uint8) * 52, m.affine), str(ao))
    vols = [("example_ct (122x101x112, 3mm)", str(samples / "example_ct.nii.gz"),
             str(samples / "example_seg_fast_force_split.nii.gz"), (122, 101, 112)),
            ("aorta CTA (120x126x164, 1.5mm, LPS)", str(samples / "aorta_report" / "ct_cropped.nii.gz"), str(ao),
             (120, 126, 164))]
    if not args.quick:
        ip, mp, shape = make_synthetic(tmp, samples)
        vols.append(("synthetic 512x512x300", ip, mp, shape))
    rows = []
    for name, image, mask, shape in vols:
        res = {}
        for method in ("fvlm", "monai", "floor"):
            runs = [run_child(method, image, mask, args.threads) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_mb"] = max(r["peak_mb"] for r in runs)
            res[method] = best
        f32 = float(np.prod(shape)) * 4 / 2**20
        rows.append({"volume": name, "float32_mb": f32, **{k: v for k, v in res.items()}})
        print(f"{name}: fvlm {res['fvlm']['seconds']:.2f}s (+write {res['fvlm']['write_s']:.2f}s), "
              f"monai {res['monai']['seconds']:.2f}s, floor {res['floor']['seconds']:.2f}s", flush=True)
    print()
    print("| volume | fvlm s | MONAI s | floor s | MONAI/fvlm | fvlm/floor | fvlm write s | peak RSS fvlm / MONAI / floor (MB) | fvlm RSS / float32 vol |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, c = r["fvlm"], r["monai"], r["floor"]
        print(f"| {r['volume']} | {a['seconds']:.2f} | {b['seconds']:.2f} | {c['seconds']:.2f} | "
              f"{b['seconds'] / a['seconds']:.2f}x | {a['seconds'] / c['seconds']:.2f}x | {a['write_s']:.2f} | "
              f"{a['peak_mb']:.0f} / {b['peak_mb']:.0f} / {c['peak_mb']:.0f} | {a['peak_mb'] / r['float32_mb']:.2f}x |")
    print()
    rt = []
    for small in (True, False):
        for comp, lvl in (("gzip", 1), ("gzip", 4), ("lzf", 1), (None, 1)):
            rt.append(read_throughput(tmp, small, comp, lvl, n_cases=8 if not small else 16,
                                      reads=300 if small else 60))
    print("| crop shapes | compression | crops/s (random reads) | mean crop (kvox) | write s | shard MB |")
    print("|---|---|---|---|---|---|")
    for r in rt:
        print(f"| {r['shapes']} | {r['compression']} | {r['crops_per_s']:.0f} | {r['mean_crop_kvox']:.0f} | "
              f"{r['write_s']:.2f} | {r['shard_mb']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"volumes": rows, "read": rt}, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
