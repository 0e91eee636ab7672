"""Scans per second of ``fvlm.load(...).embed``: from NIfTI (preprocessing included) and from shards.

A tiny random fVLM (vit3d_tiny, 32 x 32 x 16 input) on the CPU embeds the shipped sample CT
(``example_ct_sm.nii.gz`` + ``example_seg.nii.gz``) ``--scans`` times, at batch 1 and 8:

- ``nifti``: ``model.embed(path, mask=...)`` = ``case_record`` (load, HU check, reorient,
  resample, crops, whole volume) + the checkpoint's input transform + one image forward;
- ``shards``: the same scans preprocessed beforehand by ``fvlm preprocess`` and read with the
  suite's ``encode_cases`` (what ``fvlm embed`` and ``fvlm zeroshot`` run).

The ratio column is against ``nifti`` at batch 1 measured in the same run. A second table
compares the two output formats of ``fvlm embed`` (Parquet, streamed in parts, vs NPZ) on
random vectors of the same layout: write and read time, size, and peak memory of the writer.

    python benchmarks/embed_bench.py                # 16 scans, about a minute on 2 idle cores
    python benchmarks/embed_bench.py --scans 8 --rows 2000
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _shards(tmp: Path, n: int, ct: Path, seg: Path) -> Path:
    from fvlm.cli import main

    man = tmp / "manifest.csv"
    with open(man, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "patient_id", "split", "image", "mask"])
        w.writeheader()
        for i in range(n):
            w.writerow({"case_id": f"c{i:03d}", "patient_id": f"p{i:03d}", "split": "test", "image": str(ct),
                        "mask": str(seg)})
    out = tmp / "shards"
    if main(["preprocess", "--manifest", str(man), "--out", str(out), "--config", "demo/preprocess",
             "--set", "reports.labeler=false", "-q"]) != 0:
        raise SystemExit("preprocess failed")
    return out


def _checkpoint(tmp: Path, shards: Path) -> Path:
    import torch
    import yaml

    from fvlm.data import ShardDataset
    from fvlm.data.ct import SampleOptions
    from fvlm.models import create_model
    from fvlm.models.checkpoint import save_consolidated

    an = ShardDataset(shards).anatomies
    torch.manual_seed(0)
    model = create_model("fvlm", {"anatomies": an, "embed_dim": 32,
                                  "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16], "patch_size": [8, 8, 4]},
                                  "text": {"model_dir": "tiny-random"}})
    meta = {"data": SampleOptions(anatomies=an, volume_size=[32, 32, 16], crop_size=None).to_dict(),
            "preprocess": {"config": yaml.safe_load((shards / "config.yaml").read_text()),
                           "dataset": json.loads((shards / "dataset.json").read_text())}}
    return save_consolidated(tmp / "model.pt", model, meta)


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_embed(args, tmp: Path) -> list[dict]:
    import torch

    import fvlm
    from fvlm.eval import loading
    from fvlm.eval.embed import encode_cases
    from fvlm.resources import samples_dir

    torch.set_num_threads(args.threads)
    ct, seg = samples_dir() / "ct" / "example_ct_sm.nii.gz", samples_dir() / "ct" / "example_seg.nii.gz"
    shards = _shards(tmp, args.scans, ct, seg)
    ck = _checkpoint(tmp, shards)
    model = fvlm.load(ck, device="cpu")
    net, _, make_batch = loading.load_model(str(ck), "cpu")
    ds = loading.open_shards(str(shards))
    ids = ds.case_ids()
    n = args.scans
    model.embed(str(ct), mask=str(seg))                      # warm-up (imports, first forward)
    rows = []
    t_pre = _time(lambda: [model.preprocess(str(ct), str(seg)) for _ in range(min(n, 4))]) / min(n, 4)
    for bs in (1, 8):
        t = _time(lambda: model.embed([str(ct)] * n, mask=[str(seg)] * n, batch_size=bs), args.repeat)
        rows.append({"source": "nifti", "batch": bs, "scans": n, "seconds": t})
    for bs in (1, 8):
        with torch.inference_mode():
            t = _time(lambda: encode_cases(net, ds, ids, make_batch, bs, get_kwargs=make_batch.get_kwargs),
                      args.repeat)
        rows.append({"source": "shards", "batch": bs, "scans": n, "seconds": t})
    base = rows[0]["seconds"] / n
    for r in rows:
        r["scans_per_s"] = n / r["seconds"]
        r["ratio"] = base / (r["seconds"] / n)
    rows.append({"source": "preprocess only (case_record)", "batch": 1, "scans": min(n, 4),
                 "seconds": t_pre * min(n, 4), "scans_per_s": 1 / t_pre, "ratio": base / t_pre})
    return rows


def _format_child(fmt: str, rows: int, n_anat: int, dim: int, tmp: Path) -> dict:
    """Write ``rows`` random embedding rows the way ``fvlm embed`` does (parts of 256, then the
    join), in a fresh process so that its peak RSS is this format's alone."""
    import threading

    import psutil
    import pyarrow.parquet as pq

    from fvlm.commands.embed import PARQUET_OPTIONS, _join_npz, _join_parquet, _table
    from fvlm.eval.embed import CaseEmbeddings

    names = ["global"] + [f"a{i:02d}" for i in range(n_anat)]
    anats = names[1:]
    rng = np.random.default_rng(0)
    parts = tmp / f"fmt_{fmt}.parts"
    parts.mkdir()
    target = tmp / f"emb.{fmt}"
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = [rss0]
    stop = threading.Event()

    def poll():  # ru_maxrss would report the import-time peak; sample the current RSS instead
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    for k, i in enumerate(range(0, rows, 256)):
        m = min(256, rows - i)
        emb = CaseEmbeddings([f"c{i + j}" for j in range(m)],
                             {n: rng.standard_normal((m, dim)).astype(np.float32) for n in names},
                             {a: np.ones(m, bool) for a in anats})
        ids = [{"case_id": c, "patient_id": c, "split": "test"} for c in emb.case_ids]
        pq.write_table(_table(emb, ids, names, anats), parts / f"part-{k:05d}.parquet", **PARQUET_OPTIONS)
    (_join_parquet if fmt == "parquet" else _join_npz)(parts, target, {"bench": True})
    t_write = time.perf_counter() - t0
    stop.set()
    th.join()
    t0 = time.perf_counter()
    if fmt == "parquet":
        col = pq.read_table(target, columns=["emb_global"]).column("emb_global").combine_chunks()
        g = col.flatten().to_numpy().reshape(len(col), -1)
    else:
        with np.load(target, allow_pickle=False) as z:
            g = z["emb_global"]
    t_read = time.perf_counter() - t0
    assert g.shape == (rows, dim)
    return {"format": fmt, "rows": rows, "write_s": t_write, "read_global_s": t_read,
            "size_mb": target.stat().st_size / 2**20, "peak_write_mb": (peak[0] - rss0) / 2**20}


def bench_formats(args, tmp: Path) -> list[dict]:
    import subprocess

    out = []
    for rows in args.rows:
        for fmt in ("parquet", "npz"):
            d = tmp / f"{fmt}_{rows}"
            d.mkdir()
            r = subprocess.run([sys.executable, __file__, "--format-child", fmt, "--rows", str(rows),
                                "--anatomies", str(args.anatomies), "--dim", str(args.dim), "--tmp", str(d)],
                               capture_output=True, text=True, check=True)
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=int, default=16, help="scans embedded per configuration")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many timings")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 8192], help="rows of the output-format comparison")
    ap.add_argument("--anatomies", type=int, default=15)
    ap.add_argument("--dim", type=int, default=256, help="embedding size of the format comparison")
    ap.add_argument("--format-child", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.format_child:
        rows = args.rows[0] if isinstance(args.rows, list) else args.rows
        print(json.dumps(_format_child(args.format_child, int(rows), args.anatomies, args.dim, Path(args.tmp))))
        return 0
    with tempfile.TemporaryDirectory(prefix="fvlm_embed_bench_") as d:
        tmp = Path(d)
        rows = bench_embed(args, tmp)
        fmts = bench_formats(args, tmp)
    print(f"\nembed: tiny vit3d_tiny fVLM, CPU, {args.threads} torch thread(s), sample CT 122 x 101 x 30 "
          "(3 mm), demo preprocessing (whole 80 x 64 x 48)\n")
    print("| source | batch | scans | seconds | scans/s | vs nifti batch 1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['batch']} | {r['scans']} | {r['seconds']:.2f} | {r['scans_per_s']:.1f} | "
              f"{r['ratio']:.2f}x |")
    print(f"\noutput formats of `fvlm embed` (rows x {args.anatomies + 1} vectors of {args.dim} float32, "
          "written in parts of 256 rows, then joined; peak RSS growth while writing, sampled every 5 ms)\n")
    print("| format | rows | write s | read global s | size MB | peak writer memory MB |")
    print("|---|---|---|---|---|---|")
    for f in fmts:
        print(f"| {f['format']} | {f['rows']} | {f['write_s']:.2f} | {f['read_global_s']:.3f} | {f['size_mb']:.1f} | "
              f"{f['peak_write_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
