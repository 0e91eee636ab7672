"""Shard codec and layout benchmark: bytes per case and read throughput per core, v1 vs v2.

    python benchmarks/codec_bench.py [--quick] [--reads 3] [--out results.json]

Cases (default preprocess config: 1 x 1 x 3 mm, fvlm15 default crop shapes, whole volume
384 x 384 x 128): the shipped CTs and a synthetic CT-RATE-sized case (512 x 512 x 300 at
0.7 x 0.7 x 1.5 mm, ``benchmarks/ctrate_case.py``). Each case goes through
``preprocess.writer.case_record`` once; then, per codec, its v2 shard is written and read:

- bytes: the whole shard per case; ``vol`` = the resampled int16 volume alone under that codec;
  ``raw`` = uncompressed volume + label map (int16 + uint8 per voxel);
- ``decode MB/s``: full read of volume + label map (uncompressed MB per second, one core);
- ``crop-mode cases/s``: ``ShardDataset.get(volume=False)``, every present anatomy at its
  default crop shape (what a crop-mode training sample reads), and crops/s;
- ``1 crop/s``: one random anatomy crop per read (``ShardDataset.crop``);
- ``crops/s cut at MODEL_CROP``: crop mode as the loader reads it, every crop resized to the
  model input while it is cut (``get(crop_size=...)``).

The baseline is today's layout (v1) with its default gzip-1 + shuffle: whole volume, label map,
every crop and crop mask stored, one chunk per crop, measured in the same run.
Blosc2 runs single-threaded (``BLOSC_NTHREADS=1``): the numbers are per core.

    python benchmarks/codec_bench.py --access [--reads 5] [--cases 1]

``--access``: decode cost at the loader's real access pattern instead. The CT-RATE-sized case is
written once per shard codec (the layout's ``compression`` options, default chunk_shape), and a
fresh process per codec and Blosc2 thread count (``BLOSC_NTHREADS`` = 1, 2: the Blosc2 HDF5
filter's decompression context reads it; the other codecs have no threads) reads exactly what a
training sample reads, :func:`fvlm.data.inputs.read_regions` for the volume-mode input of
``configs/train/vitb3d_gpu.yaml`` and the crop-mode input of ``vitb3d_crop_gpu.yaml``
(the chunk cache is off, so every read decompresses). Per sample: worker CPU-s (process time,
user + sys of all its threads, not wall time), the ratio to the default codec in the same run,
and the loader cores per H100 that follow (GPU samples/s from ``loader_bench.vit_flops`` x
worker CPU-s per sample); plus the shard bytes per case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BLOSC_NTHREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctrate_case import ctrate_case, shipped_cases, write_copies  # noqa: E402

#: crop-mode model input the resized-on-read column cuts to (x, y, z)
MODEL_CROP = (96, 96, 48)
# (name, compression, level, shuffle)
CODECS = [("none", "none", 0, "none"), ("gzip-1 +shuffle", "gzip", 1, "byte"), ("gzip-4 +shuffle", "gzip", 4, "byte"),
          ("lzf +shuffle", "lzf", 0, "byte"), ("zstd-3 (no shuffle)", "zstd", 3, "none"), ("lz4 (no shuffle)", "lz4", 0, "none"),
          ("blosc2-lz4-5 byte", "blosc2-lz4", 5, "byte"), ("blosc2-lz4-5 bit", "blosc2-lz4", 5, "bit"),
          ("blosc2-zstd-1 byte", "blosc2-zstd", 1, "byte"), ("blosc2-zstd-1 bit", "blosc2-zstd", 1, "bit"),
          ("blosc2-zstd-5 bit", "blosc2-zstd", 5, "bit")]


def _records(quick: bool):
    from fvlm.anatomy import load_anatomy_set
    from preprocess.config import PreprocessConfig
    from preprocess.inputs import CaseSpec
    from preprocess.writer import build_layout, case_record

    cfg = PreprocessConfig()
    cfg.reports.labeler = False
    aset = load_anatomy_set(cfg.anatomy_set)
    layout = build_layout(cfg, aset)
    cases = shipped_cases()
    if not quick:
        cases.append(("synthetic CT-RATE 512x512x300 0.7x0.7x1.5mm", *ctrate_case()))
    for name, image, mask in cases:
        yield name, case_record(CaseSpec(case_id="b", image=image, mask=mask), cfg, aset, layout), cfg, aset


def _v2_dir(root: Path, layout, rec):
    from fvlm.data.shards import write_dataset_info, write_index, write_shard

    t0 = time.perf_counter()
    write_shard(root / "shards/000-00000.h5", layout, [rec], n=1)
    t = time.perf_counter() - t0
    write_index(root / "index.jsonl", [{"case_id": rec.case_id, "patient_id": "", "split": "", "row": 0,
                                        "shard": "shards/000-00000.h5",
                                        "anatomies": [a for a in layout.anatomies if rec.present[a]]}])
    write_dataset_info(root, layout)
    return t, (root / "shards/000-00000.h5").stat().st_size


def _vol_alone(path: Path, layout, vol) -> int:
    from fvlm.data.shards import open_h5

    with open_h5(path, "w", libver="earliest") as f:
        f.create_dataset("v", data=vol, chunks=layout.chunks_for(vol.shape), **layout.filter_kwargs())
    return path.stat().st_size


def _timed(fn, reads: int) -> float:
    fn()  # warm: file open, page cache
    t0 = time.perf_counter()
    for _ in range(reads):
        fn()
    return (time.perf_counter() - t0) / reads


def measure_v2(tmp: Path, base_layout, rec, comp, level, shuffle, reads: int) -> dict:
    from dataclasses import replace

    from fvlm.data import ShardDataset
    from fvlm.data.shards import open_h5

    layout = replace(base_layout, compression=comp, compression_level=level, shuffle=shuffle)
    root = tmp / f"v2_{comp}_{level}_{shuffle}"
    write_s, nbytes = _v2_dir(root, layout, rec)
    vol_bytes = _vol_alone(tmp / f"vol_{comp}_{level}_{shuffle}.h5", layout, rec.volume)
    ds = ShardDataset(root)
    present = [a for a in layout.anatomies if rec.present[a]]

    def full():
        f = ds._file("shards/000-00000.h5")
        return f["volume/0"][()], f["label_map/0"][()]

    t_full = _timed(full, reads)
    t_crops = _timed(lambda: ds.get("b", volume=False), reads)
    t_small = _timed(lambda: ds.get("b", volume=False, crop_size=MODEL_CROP), reads)
    rng = np.random.default_rng(0)
    seq = [present[i] for i in rng.integers(len(present), size=max(reads * 3, len(present)))]
    t0 = time.perf_counter()
    for a in seq:
        ds.crop("b", a)
    t_one = (time.perf_counter() - t0) / len(seq)
    ds.close()
    with open_h5(root / "shards/000-00000.h5") as f:
        assert np.array_equal(f["volume/0"][()], rec.volume)
    raw = rec.volume.size * 3
    return {"write_s": write_s, "bytes": nbytes, "vol_bytes": vol_bytes, "raw_bytes": raw,
            "decode_mb_s": raw / 2**20 / t_full, "crop_cases_s": 1 / t_crops, "crops_s": len(present) / t_crops,
            "one_crop_s": 1 / t_one, "resized_crops_s": len(present) / t_small, "n_crops": len(present)}


def measure_v1(tmp: Path, base_layout, rec, reads: int) -> dict:
    """Today's layout: whole volume + label map + every crop + crop mask, gzip-1 + shuffle, one chunk each."""
    from fvlm.data.shards import open_h5
    from preprocess.crop import center_fit, crop_anatomy

    L = base_layout
    kw = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    path = tmp / "v1.h5"
    present = [a for a in L.anatomies if rec.present[a]]
    crops = {}
    for a in present:
        img, msk, _ = crop_anatomy(rec.volume, rec.label_map, L.anatomies.index(a) + 1, rec.bbox[a], L.spacing_mm,
                                   L.crop_shapes[a], L.margin(a), L.crop_oversize)
        crops[a] = (img, msk)
    t0 = time.perf_counter()
    with open_h5(path, "w", libver="earliest") as f:
        v, _ = center_fit(rec.volume, L.whole_shape, -1024)
        m, _ = center_fit(rec.label_map, L.whole_shape, 0)
        f.create_dataset("volume", data=v[None], chunks=(1, *v.shape), **kw)
        f.create_dataset("label_map", data=m[None], chunks=(1, *m.shape), **kw)
        for a, (img, msk) in crops.items():
            f.create_dataset(f"crops/{a}", data=img[None], chunks=(1, *img.shape), **kw)
            f.create_dataset(f"crop_masks/{a}", data=msk[None], chunks=(1, *msk.shape), **kw)
    write_s = time.perf_counter() - t0
    f = open_h5(path, "r", rdcc_nbytes=0)

    def all_crops():
        for a in present:
            f["crops"][a][0], f["crop_masks"][a][0]

    t_crops = _timed(all_crops, reads)
    f.close()
    return {"write_s": write_s, "bytes": path.stat().st_size, "crop_cases_s": 1 / t_crops,
            "crops_s": len(present) / t_crops, "n_crops": len(present)}


# ----------------------------------------------------------------- the loader's access pattern

#: shard codecs of the access-pattern section: (name, compression, level, shuffle); None = the
#: default preprocess config's own (the first row is the default, the ratios' baseline)
ACCESS_CODECS = [("blosc2-zstd (default)", None, None, None), ("blosc2-lz4-5 bit", "blosc2-lz4", 5, "bit"),
                 ("zstd-3", "zstd", 3, "none"), ("lz4", "lz4", 0, "none"), ("gzip-1 +shuffle", "gzip", 1, "byte"),
                 ("none", "none", 0, "none")]
ACCESS_THREADS = (1, 2)
ACCESS_CONFIGS = (("volume", "train/vitb3d_gpu.yaml"), ("crop", "train/vitb3d_crop_gpu.yaml"))


def _access_corpora(tmp: Path, n_cases: int) -> list[dict]:
    """The CT-RATE-sized case stored ``n_cases`` times under each codec of :data:`ACCESS_CODECS`."""
    from dataclasses import replace

    from fvlm.anatomy import load_anatomy_set
    from preprocess.config import PreprocessConfig
    from preprocess.inputs import CaseSpec
    from preprocess.writer import build_layout, case_record

    cfg = PreprocessConfig()
    cfg.reports.labeler = False
    aset = load_anatomy_set(cfg.anatomy_set)
    base = build_layout(cfg, aset)
    image, mask = ctrate_case()
    rec = case_record(CaseSpec(case_id="x", image=image, mask=mask), cfg, aset, base)
    recs = [type(rec)(**{**vars(rec), "case_id": f"c{i}", "patient_id": f"p{i}", "split": "train"})
            for i in range(n_cases)]
    out = []
    for name, comp, level, shuf in ACCESS_CODECS:
        layout = base if comp is None else replace(base, compression=comp, compression_level=level, shuffle=shuf)
        root = tmp / f"access_{len(out)}"
        shard = write_copies(root, layout, recs, aset.name)
        label = (f"{layout.compression}-{layout.compression_level} {layout.shuffle}" if comp is None else name)
        out.append({"codec": name if comp is not None else f"{label} (default)", "compression": layout.compression,
                    "root": str(root), "chunk_shape": list(layout.chunk_shape), "stored_shape": list(rec.volume.shape),
                    "bytes_per_case": shard.stat().st_size / n_cases})
    return out


def _access_child(root: str, reads: int) -> None:
    """In a fresh process (``BLOSC_NTHREADS`` set by the parent): per mode, CPU-s and wall-s per
    ``read_regions`` of one sample, as JSON on stdout."""
    import torch

    torch.set_num_threads(1)
    from fvlm.data.inputs import read_regions
    from fvlm.data.shards import ShardDataset
    from loader_bench import _opts

    ds = ShardDataset(root)
    ids = ds.case_ids()
    res = {}
    for mode, config in ACCESS_CONFIGS:
        opts = _opts(config, ds)[0]
        read_regions(ds, ids[0], opts, opts.anatomies, ds.anatomies)  # open, page cache, label checks
        c0, t0, s0 = time.process_time(), time.perf_counter(), os.times().system
        nbytes = 0
        for k in range(reads):
            _, raw = read_regions(ds, ids[k % len(ids)], opts, opts.anatomies, ds.anatomies)
            nbytes += sum(v.numel() * v.element_size() + m.numel() * m.element_size() for v, m in raw["boxes"])
        res[mode] = {"cpu_s": (time.process_time() - c0) / reads, "wall_s": (time.perf_counter() - t0) / reads,
                     "sys_s": (os.times().system - s0) / reads, "box_bytes": nbytes / reads}
    print(json.dumps(res))


def _gpu_rates(root: str) -> dict:
    """GPU samples/s per mode (loader_bench's ViT-B/3D arithmetic on the configs' inputs) and its lines."""
    from fvlm.data.shards import ShardDataset
    from loader_bench import _opts, vit_flops

    ds = ShardDataset(root)
    out = {}
    for mode, config in ACCESS_CONFIGS:
        opts, img, patch = _opts(config, ds)
        out[mode] = vit_flops(img, patch, 1 if mode == "volume" else len(opts.anatomies))
    ds.close()
    return out


def access_main(reads: int, n_cases: int, out_path: str | None) -> None:
    import subprocess

    import hdf5plugin

    print(f"machine: {os.cpu_count()} CPUs; hdf5plugin {hdf5plugin.version}; one torch thread; "
          f"read_regions of the CT-RATE-sized case x {n_cases} per codec, {reads} timed reads per mode")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fvlm_codec_access_") as d:
        corpora = _access_corpora(Path(d), n_cases)
        rates = _gpu_rates(corpora[0]["root"])
        for mode, (rate, lines) in rates.items():
            print(f"\n{mode} mode GPU rate:")
            for ln in lines:
                print("  " + ln)
        print(f"\nstored grid {tuple(corpora[0]['stored_shape'])}, chunk_shape {tuple(corpora[0]['chunk_shape'])}")
        for c in corpora:
            threads = ACCESS_THREADS if c["compression"].startswith("blosc2-") else (1,)
            for n in threads:
                env = {**os.environ, "BLOSC_NTHREADS": str(n), "OMP_NUM_THREADS": "1"}
                p = subprocess.run([sys.executable, __file__, "--_access-child", c["root"], "--reads", str(reads)],
                                   env=env, capture_output=True, text=True, check=True)
                m = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append({**{k: v for k, v in c.items() if k != "root"}, "threads": n, **m})
                print(f"  {c['codec']} x{n} thread(s): " + ", ".join(
                    f"{mode} {m[mode]['cpu_s'] * 1e3:.0f} ms CPU / {m[mode]['wall_s'] * 1e3:.0f} ms wall"
                    for mode, _ in ACCESS_CONFIGS), flush=True)
    base = rows[0]
    print("\n| codec | Blosc2 threads | MB/case on disk | mode | box MB read | worker CPU ms/sample | "
          "of which sys | vs default | wall ms/sample | GPU samples/s | loader cores per H100 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode, _ in ACCESS_CONFIGS:
            cpu, gpu = r[mode]["cpu_s"], rates[mode][0]
            print(f"| {r['codec']} | {r['threads'] if r['compression'].startswith('blosc2-') else '-'} | "
                  f"{r['bytes_per_case'] / 1e6:.1f} | {mode} | {r[mode]['box_bytes'] / 1e6:.1f} | {cpu * 1e3:.0f} | "
                  f"{r[mode]['sys_s'] * 1e3:.0f} | {cpu / base[mode]['cpu_s']:.2f}x | {r[mode]['wall_s'] * 1e3:.0f} | {gpu:.0f} | {gpu * cpu:.0f} |")
    print("\n(worker CPU = process time of the reading process, all its threads; vs default = CPU-s per "
          "sample / the default codec's at 1 thread, same run; loader cores per H100 = GPU samples/s x "
          "worker CPU-s per sample, the fvlm cache not used. wall ms is on a shared machine: CPU ms is "
          "the number to compare.)")
    if out_path:
        Path(out_path).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--access", action="store_true", help="decode CPU per sample at the loader's access pattern "
                                                          "(read_regions), per codec and Blosc2 thread count")
    ap.add_argument("--cases", type=int, default=1, help="--access: copies of the CT-RATE-sized case per shard")
    ap.add_argument("--_access-child", dest="access_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="shipped CTs only (no CT-RATE-sized case)")
    ap.add_argument("--reads", type=int, default=3, help="timed repetitions per read kind")
    ap.add_argument("--codecs", default="", help="comma-separated subset of codec names (default all)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()
    if args.access_child:
        return _access_child(args.access_child, args.reads)
    if args.access:
        return access_main(args.reads, args.cases, args.out)
    from fvlm.data.shards import ShardLayout  # noqa: F401 - import cost outside the timings

    codecs = [c for c in CODECS if not args.codecs or c[0] in args.codecs.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="fvlm_codec_") as d:
        tmp = Path(d)
        for name, rec, cfg, aset in _records(args.quick):
            from preprocess.writer import build_layout

            layout = build_layout(cfg, aset)
            v1 = measure_v1(tmp, layout, rec, args.reads)
            rows = []
            for cname, comp, level, shuf in codecs:
                r = measure_v2(tmp, layout, rec, comp, level, shuf, args.reads)
                r["codec"] = cname
                rows.append(r)
            results.append({"case": name, "resampled_shape": list(rec.volume.shape), "v1_gzip1": v1, "v2": rows})
            _print_case(name, rec, v1, rows)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def _print_case(name, rec, v1, rows) -> None:
    raw = rows[0]["raw_bytes"]
    print(f"\n### {name}: resampled {tuple(rec.volume.shape)}, {v1['n_crops']} anatomies present\n")
    print(f"v1 today (gzip-1, crops stored): {v1['bytes'] / 2**20:.1f} MB/case, write {v1['write_s']:.2f} s, "
          f"crop-mode {v1['crop_cases_s']:.2f} cases/s = {v1['crops_s']:.1f} crops/s\n")
    print("| v2 codec | MB/case | / vol alone | / uncompressed | v1 MB / v2 MB | write s | decode MB/s | "
          f"crop-mode cases/s | crops/s | vs v1 | 1 crop/s | crops/s cut at {MODEL_CROP} | vs v1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / r['vol_bytes']:.2f} | "
              f"{r['bytes'] / raw:.3f} | {v1['bytes'] / r['bytes']:.1f}x | {r['write_s']:.2f} | "
              f"{r['decode_mb_s']:.0f} | {r['crop_cases_s']:.2f} | {r['crops_s']:.1f} | "
              f"{r['crops_s'] / v1['crops_s']:.1f}x | {r['one_crop_s']:.1f} | {r['resized_crops_s']:.0f} | "
              f"{r['resized_crops_s'] / v1['crops_s']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
