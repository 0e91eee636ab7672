"""Benchmark of `fvlm preprocess` per case, write included, against a floor and a MONAI pipeline.

    python benchmarks/preprocess_bench.py [--quick] [--repeats 2] [--cases 24] [--out FILE]

Per volume, each method runs in a fresh subprocess (its peak RSS is its own; imports are paid
before the clock starts), from the file on disk to a compressed one-case HDF5 file (the default
shard codec and chunking: Blosc2-Zstd 1 + bitshuffle, 64x64x32 chunks):

  (a) fvlm: ``preprocess.writer.case_record`` (load, HU check, canonical RAS, label lookup, one
      resample per array to 1x1x3 mm, boxes, crop geometry) + ``write_shard`` (what one worker of
      ``fvlm preprocess`` does per case, staged shard included);
  (b) MONAI: Compose(LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd bilinear/nearest),
      the same class -> anatomy lookup, int16 HU, boxes (scipy find_objects), and the same two
      arrays written with h5py under the same codec and chunks;
  (c) floor: nibabel decode + one trilinear resample of the image (torch) + one compressed write of
      that volume: the least any tool must do.

Goals (issue 14): fvlm <= 1.5x the floor, MONAI/fvlm >= 1.3x, peak RSS <= 1.2 GB on the
512x512x300 case. Then the command itself: ``fvlm preprocess`` on ``--cases`` copies of the shipped
CTs with 1 and 2 workers (cases/s, speed-up; goal >= 1.6x on an idle 2-core machine) and the time
from launch to its first case starting (imports and set-up; goal <= 2 s). With 2 workers each
spawned worker pays its own imports and report labeler (about 2 s), a fixed cost that a corpus of
thousands of cases hides and a run of 8 cases does not: hence 24 cases by default.
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


def _write_arrays(path: Path, arrays: dict, layout) -> None:
    """The arrays written as the shard writes its images: same filter, same chunks."""
    from fvlm.data.shards import open_h5

    with open_h5(path, "w") as f:
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr, chunks=layout.chunks_for(arr.shape), **layout.filter_kwargs())


def child(method: str, image: str, mask: str) -> dict:
    import nibabel as nib  # noqa: F401
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from fvlm.anatomy import load_anatomy_set
    from fvlm.data.shards import write_shard
    from preprocess.config import PreprocessConfig
    from preprocess.inputs import CaseSpec
    from preprocess.writer import build_layout, case_record

    cfg = PreprocessConfig()
    cfg.reports.labeler = False
    aset = load_anatomy_set(cfg.anatomy_set)
    layout = build_layout(cfg, aset)
    # import costs stay outside the timing (every method pays them once per process)
    import h5py  # noqa: F401
    import hdf5plugin  # noqa: F401
    import monai.transforms as mt
    import scipy.ndimage
    import SimpleITK  # noqa: F401

    base = _rss_mb()
    _reset_peak()
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "case.h5"
        t0 = time.perf_counter()
        if method == "fvlm":
            rec = case_record(CaseSpec(case_id="b", image=image, mask=mask), cfg, aset, layout)
            t1 = time.perf_counter()
            write_shard(dst, layout, [rec], n=1)
            out["write_s"] = time.perf_counter() - t1
            out["shape"] = list(rec.volume.shape)
        elif method == "monai":
            pipe = mt.Compose([
                mt.LoadImaged(keys=["img", "seg"], image_only=True),
                mt.EnsureChannelFirstd(keys=["img", "seg"]),
                mt.Orientationd(keys=["img", "seg"], axcodes="RAS"),
                mt.Spacingd(keys=["img", "seg"], pixdim=tuple(cfg.target_spacing_mm), mode=("bilinear", "nearest")),
            ])
            dd = pipe({"img": image, "seg": mask})
            t1 = time.perf_counter()
            vol = np.clip(np.rint(np.asarray(dd["img"][0])), -1024, 3071).astype(np.int16)
            lab = aset.lookup(cfg.masks.class_map)[np.asarray(dd["seg"][0]).astype(np.int64)].astype(np.uint8)
            boxes = scipy.ndimage.find_objects(lab, max_label=len(aset))
            out["boxes"] = sum(b is not None for b in boxes)
            _write_arrays(dst, {"volume": vol, "label_map": lab}, layout)
            out["write_s"] = time.perf_counter() - t1
            out["shape"] = list(vol.shape)
        elif method == "floor":
            img = nib.load(image)
            arr = np.asanyarray(img.dataobj)
            sp = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
            tsp = np.asarray(cfg.target_spacing_mm)
            size = [int(round((n - 1) * s / t + 1)) for n, s, t in zip(arr.shape, sp, tsp)]
            vol = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(arr))[None, None].float(),
                                                  size=size, mode="trilinear", align_corners=True)[0, 0]
            t1 = time.perf_counter()
            _write_arrays(dst, {"volume": vol.round().to(torch.int16).numpy()}, layout)
            out["write_s"] = time.perf_counter() - t1
            out["shape"] = size
        else:
            raise SystemExit(f"unknown method {method}")
        out["seconds"] = time.perf_counter() - t0
        out["file_mb"] = dst.stat().st_size / 2**20
    out["peak_mb"] = _peak_mb() - base
    return out


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


def run_command(man: Path, out: Path, workers: int) -> dict:
    """``fvlm preprocess`` as a user runs it: wall time, and seconds from launch to its first case starting
    (the log line "... to process with N worker(s)" follows every piece of set-up)."""
    cmd = [sys.executable, "-m", "fvlm.cli", "preprocess", "--manifest", str(man), "--out", str(out),
           "--num-workers", str(workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    first = None
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    tail = []
    for line in p.stderr:
        tail.append(line)
        if first is None and "to process with" in line:
            first = time.perf_counter() - t0
    rc = p.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"fvlm preprocess --num-workers {workers} failed ({rc}):\n{''.join(tail[-30:])}")
    return {"workers": workers, "wall_s": wall, "first_case_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "IMAGE", "MASK"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="skip the synthetic 512x512x300 volume")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method and volume (best time kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per method (a worker has 1 core)")
    ap.add_argument("--cases", type=int, default=24, help="cases for the --num-workers 1 vs 2 run (0: skip)")
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import nibabel as nib

    samples = ROOT / "fvlm" / "samples" / "ct"
    tmp = Path(tempfile.mkdtemp(prefix="fvlm_bench_"))
    ao = tmp / "aorta_ts.nii.gz"
    m = nib.load(samples / "aorta_report" / "aorta.nii.gz")
    nib.save(nib.Nifti1Image((np.asarray(m.dataobj) > 0).astype(np.uint8) * 52, m.affine), str(ao))
    vols = [("example_ct (122x101x112, 3mm)", str(samples / "example_ct.nii.gz"),
             str(samples / "example_seg_fast_force_split.nii.gz"), (122, 101, 112)),
            ("aorta CTA (120x126x164, 1.5mm, LPS)", str(samples / "aorta_report" / "ct_cropped.nii.gz"), str(ao),
             (120, 126, 164))]
    if not args.quick:
        ip, mp, shape = make_synthetic(tmp, samples)
        vols.append(("synthetic 512x512x300 (0.7x0.7x1.5 mm class)", ip, mp, shape))
    rows = []
    for name, image, mask, shape in vols:
        res = {}
        for method in ("fvlm", "monai", "floor"):
            runs = [run_child(method, image, mask, args.threads) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_mb"] = max(r["peak_mb"] for r in runs)
            res[method] = best
        src_mb = float(np.prod(shape)) * 2 / 2**20
        rows.append({"volume": name, "int16_source_mb": src_mb, **res})
        print(f"{name}: fvlm {res['fvlm']['seconds']:.2f}s, monai {res['monai']['seconds']:.2f}s, "
              f"floor {res['floor']['seconds']:.2f}s", flush=True)
    print()
    print(f"Per case, file on disk -> compressed one-case HDF5 file, {args.threads} thread(s), best of {args.repeats}")
    print("| volume | fvlm s (write s) | MONAI s (write s) | floor s (write s) | fvlm / floor (goal <= 1.5) "
          "| MONAI / fvlm (goal >= 1.3) | file MB fvlm / MONAI / floor | peak RSS MB fvlm / MONAI / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, c = r["fvlm"], r["monai"], r["floor"]
        print(f"| {r['volume']} | {a['seconds']:.2f} ({a['write_s']:.2f}) | {b['seconds']:.2f} ({b['write_s']:.2f}) | "
              f"{c['seconds']:.2f} ({c['write_s']:.2f}) | {a['seconds'] / c['seconds']:.2f}x | "
              f"{b['seconds'] / a['seconds']:.2f}x | {a['file_mb']:.1f} / {b['file_mb']:.1f} / {c['file_mb']:.1f} | "
              f"{a['peak_mb']:.0f} / {b['peak_mb']:.0f} / {c['peak_mb']:.0f} |")
    big = rows[-1]
    print(f"\nAt corpus scale: {big['volume']} takes {big['fvlm']['seconds']:.1f} s per core -> 50,000 such volumes "
          f"= {50000 * big['fvlm']['seconds'] / 3600:.0f} core-hours ({50000 * big['fvlm']['seconds'] / 3600 / 64:.1f} h "
          f"on 64 cores); {big['fvlm']['file_mb']:.1f} MB per case -> {50000 * big['fvlm']['file_mb'] / 2**20:.2f} TB")
    cmd_rows = []
    if args.cases:
        import csv

        man = tmp / "manifest.csv"
        with open(man, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case_id", "patient_id", "split", "image", "mask"])
            w.writeheader()
            for i in range(args.cases):
                _, image, mask, _ = vols[i % 2]
                w.writerow({"case_id": f"c{i:03d}", "patient_id": f"p{i}", "split": "train", "image": image,
                            "mask": mask})
        for workers in (1, 2):
            cmd_rows.append(run_command(man, tmp / f"out_w{workers}", workers))
        one, two = cmd_rows
        print(f"\n`fvlm preprocess` on {args.cases} cases (the two shipped CTs alternating), {os.cpu_count()} cores")
        print("| workers | wall s | cases/s | speed-up vs 1 (goal >= 1.6) | launch -> first case s (goal <= 2) |")
        print("|---|---|---|---|---|")
        for r in cmd_rows:
            print(f"| {r['workers']} | {r['wall_s']:.1f} | {args.cases / r['wall_s']:.2f} | "
                  f"{one['wall_s'] / r['wall_s']:.2f}x | {r['first_case_s']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"volumes": rows, "command": cmd_rows}, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
