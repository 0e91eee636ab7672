"""Can the loader keep an H100 fed? The host/device split of the sample path, per sample.

    python benchmarks/loader_bench.py [--cases 4] [--batches 3] [--small] [--device cuda]

Corpus: the synthetic CT-RATE-sized case (``benchmarks/ctrate_case.py``: 512 x 512 x 300 at
0.7 x 0.7 x 1.5 mm) preprocessed with the default config (v2 shards at 1 x 1 x 3 mm, default
codec), stored ``--cases`` times (``--small``: the shipped example_ct). Two inputs, each the
shipped GPU config's own:

- volume mode, ``configs/train/vitb3d_gpu.yaml``: the whole volume fitted into 352 x 256 x 112;
- crop mode, ``configs/train/vitb3d_crop_gpu.yaml``: the 15 fvlm15 anatomy crops at 96 x 96 x 48.

Rows, per sample (one thread, in process, so a busy machine does not change them):

- ``before``: what a loader worker did until this issue (``ShardDataset.get`` cut + resample, window,
  float32 resize and masks on the CPU; measured here with the same reader);
- ``shards``: the worker's part now (:func:`fvlm.data.ct.read_batch`: one int16/uint8 hyperslab at
  the stored resolution + the sampling plan), and the device stage (:func:`prepare_batch`);
- ``cache``: the worker reading ``fvlm cache``'s model-grid arrays (a memory copy), and its device stage.

Worker CPU-s is process CPU time (user + sys) of the host stage; H2D bytes are what the host
stage hands to the device stage; device ms is the device stage on ``--device`` (on a CPU an
upper bound of the GPU's). Cores per H100 = the GPU's samples/s x worker CPU-s per sample, the
GPU's samples/s from the ViT-B/3D training FLOPs at 40 % of bf16 peak (arithmetic printed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctrate_case import ctrate_case, shipped_cases, write_copies  # noqa: E402

H100_BF16_PEAK = 989e12          # dense bf16 FLOP/s (H100 SXM)
MFU = 0.40
H2D_GOAL = 10e9                  # bytes/s per GPU
CORES_GOAL = 4


def vit_flops(img, patch, n_images: int = 1) -> tuple[float, list[str]]:
    """Training FLOPs per sample of a ViT-B/3D tower on ``n_images`` inputs of ``img``, with the arithmetic."""
    L, d = 12, 768
    N = 1
    for s, p in zip(img, patch):
        N *= s // p
    per_layer = N * (24 * d * d + 4 * N * d)  # qkv + proj 4d^2 and MLP 8d^2 MACs = 24d^2 FLOP; QK^T + AV 4Nd FLOP
    embed = 2 * N * (patch[0] * patch[1] * patch[2]) * d
    fwd = (L * per_layer + embed) * n_images
    train = 4 * fwd                               # forward + backward (2x) + recompute (grad checkpointing on)
    rate = H100_BF16_PEAK * MFU / train
    grid = " * ".join(str(s // p) for s, p in zip(img, patch))
    lines = [f"{n_images} x {list(img)} / patch {list(patch)}: tokens N = {grid} = {N} per image"
             + (f", {N * n_images} per sample" if n_images > 1 else ""),
             f"per layer = N (24 d^2 + 4 N d) = {per_layer / 1e9:.2f} GFLOP; patch embed {embed / 1e9:.2f} GFLOP",
             f"training = 4 x forward (fwd + 2x bwd + checkpoint recompute) = {train / 1e9:.0f} GFLOP/sample",
             f"H100 bf16 {H100_BF16_PEAK / 1e12:.0f} TFLOP/s x {MFU:.0%} -> {rate:.0f} samples/s per GPU "
             "(text tower frozen, not counted)"]
    return rate, lines


def build_corpus(root: Path, n: int, small: bool) -> None:
    from fvlm.anatomy import load_anatomy_set
    from preprocess.config import PreprocessConfig
    from preprocess.inputs import CaseSpec
    from preprocess.writer import build_layout, case_record

    cfg = PreprocessConfig()
    cfg.reports.labeler = False
    image, mask = shipped_cases()[0][1:] if small else ctrate_case()
    aset = load_anatomy_set(cfg.anatomy_set)
    layout = build_layout(cfg, aset)
    rec = case_record(CaseSpec(case_id="x", image=image, mask=mask), cfg, aset, layout)
    rec.report = {"findings": "The lungs are clear.", "impressions": "", "report": ""}
    recs = [type(rec)(**{**vars(rec), "case_id": f"c{i}", "patient_id": f"p{i}", "split": "train"}) for i in range(n)]
    write_copies(root, layout, recs, aset.name)


def _opts(config: str, ds):
    from fvlm.config import load_config
    from fvlm.data.ct import SampleOptions
    from fvlm.ct.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, files=[config], base="train/default.yaml")
    crop = cfg.model.mode == "crop"
    cfg.data.load_volume, cfg.data.load_crops = not crop, crop
    cfg.data.crop_size = list(cfg.model.image.img_size)
    opts = SampleOptions.from_config(cfg.data, ds.anatomies, [])
    return opts, cfg.model.image.img_size, cfg.model.image.patch_size


def _fit(x, size, mode: str, pad: float):
    """The loader's CPU resize before this issue: aspect-keeping ``F.interpolate`` + centre padding."""
    import torch
    import torch.nn.functional as F

    from fvlm.data.inputs import fit_size

    resized, before = fit_size(x.shape[1:], size)
    if mode == "nearest":
        y = F.interpolate(x[None].float(), size=tuple(resized), mode="nearest-exact")[0].to(x.dtype)
    else:
        y = F.interpolate(x[None], size=tuple(resized), mode="trilinear", align_corners=False)[0]
    out = torch.full((x.shape[0], *size), pad, dtype=y.dtype)
    out[(slice(None), *(slice(b, b + r) for b, r in zip(before, resized)))] = y
    return out


def _before(ds, ids, opts) -> None:
    """The worker's work until this issue: cut and resample in the reader, window, resize, masks."""
    import numpy as np
    import torch

    from fvlm.data.shards import AIR_HU, window

    for cid in ids:
        if opts.volume_size is not None:
            rec = ds.get(cid, crops=False)
            air = float(window(np.full(1, AIR_HU, np.int16), *opts.window)[0])
            _fit(torch.from_numpy(window(rec.volume, *opts.window))[None], opts.volume_size, "trilinear", air)
            _fit(torch.from_numpy(np.asarray(rec.label_map))[None], opts.volume_size, "nearest", 0)
        else:
            rec = ds.get(cid, anatomies=opts.anatomies, volume=False, crop_size=opts.crop_size)
            for a in opts.anatomies:
                torch.from_numpy(window(rec.crops[a], *opts.window))
                torch.from_numpy(rec.crop_masks[a])


def _raw_bytes(batch) -> int:
    n = 0
    for raw in batch["raw"]:
        for v in raw.values():
            if hasattr(v, "element_size"):
                n += v.numel() * v.element_size()
        for v, m in raw.get("boxes", []):
            n += v.numel() * v.element_size() + m.numel() * m.element_size()
    return n


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(source, ds, opts, batches: int, bs: int, device: str) -> dict:
    """Per sample: worker CPU-s (host stage), H2D bytes, device-stage ms; and the ``before`` worker CPU-s."""
    from fvlm.data.ct import prepare_batch, read_batch

    ids = ds.case_ids()
    groups = [[ids[(b * bs + k) % len(ids)] for k in range(bs)] for b in range(batches + 1)]
    read_batch(source, groups[0], opts)                     # open files, warm the page cache
    cpu, dev_s, nbytes = 0.0, 0.0, 0
    for g in groups[1:]:
        c0 = time.process_time()
        host = read_batch(source, g, opts)
        cpu += time.process_time() - c0
        nbytes += _raw_bytes(host)
        _sync(device)
        t0 = time.perf_counter()
        prepare_batch(host, opts, device)
        _sync(device)
        dev_s += time.perf_counter() - t0
    n = batches * bs
    return {"cpu_s": cpu / n, "bytes": nbytes / n, "device_ms": 1e3 * dev_s / n}


def before_cpu(ds, opts, batches: int, bs: int) -> float:
    ids = ds.case_ids()
    _before(ds, ids[:1], opts)
    c0 = time.process_time()
    for b in range(batches):
        _before(ds, [ids[(b * bs + k) % len(ids)] for k in range(bs)], opts)
    return (time.process_time() - c0) / (batches * bs)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="shipped example_ct instead of the CT-RATE-sized case")
    ap.add_argument("--device", default="cpu", help="where the device stage runs (cpu: an upper bound)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from fvlm.data.cache import CachedShards, build_cache
    from fvlm.data.shards import ShardDataset

    print(f"machine: {os.cpu_count()} CPUs, device stage on {args.device}; one thread; "
          f"{'example_ct' if args.small else 'CT-RATE-sized 512x512x300 case'} x {args.cases}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fvlm_loader_") as d:
        root = Path(d)
        build_corpus(root, args.cases, args.small)
        ds = ShardDataset(root)
        shard_mb = sum(p.stat().st_size for p in (root / "shards").glob("*.h5")) / args.cases / 1e6
        for mode, config in (("volume", "train/vitb3d_gpu.yaml"), ("crop", "train/vitb3d_crop_gpu.yaml")):
            opts, img, patch = _opts(config, ds)
            gpu, lines = vit_flops(img, patch, 1 if mode == "volume" else len(opts.anatomies))
            print(f"\n{mode} mode ({config}):")
            for ln in lines:
                print("  " + ln)
            t0 = time.perf_counter()
            cdir = build_cache(ds, opts, root / f"cache_{mode}")
            build_s = (time.perf_counter() - t0) / args.cases
            cache_mb = sum(p.stat().st_size for p in cdir.iterdir() if p.is_file()) / args.cases / 1e6
            print(f"  bytes per case: v2 shards {shard_mb:.1f} MB (compressed, all modes); "
                  f"cache {cache_mb:.1f} MB (uncompressed, this input; built at {build_s:.2f} s/case here)")
            old = before_cpu(ds, opts, args.batches, args.batch_size)
            rows.append((mode, "before (worker resamples)", old, None, None, gpu))
            for name, src in (("shards", ds), ("cache", CachedShards(ds, cdir, opts))):
                m = measure(src, ds, opts, args.batches, args.batch_size, args.device)
                rows.append((mode, name, m["cpu_s"], m["bytes"], m["device_ms"], gpu))
                print(f"  {name}: worker {m['cpu_s'] * 1e3:.1f} ms CPU, {m['bytes'] / 1e6:.1f} MB to the device, "
                      f"device stage {m['device_ms']:.1f} ms ({args.device})", flush=True)
    print("\n| mode | path | worker CPU ms/sample | vs before | H2D MB/sample | H2D GB/s at GPU rate | "
          f"device ms/sample ({args.device}) | GPU samples/s | loader cores per H100 |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {}
    for mode, name, cpu, b, dms, gpu in rows:
        base.setdefault(mode, cpu)
        cores = gpu * cpu
        print(f"| {mode} | {name} | {cpu * 1e3:.1f} | {base[mode] / cpu:.1f}x less | "
              f"{'-' if b is None else f'{b / 1e6:.1f}'} | {'-' if b is None else f'{gpu * b / 1e9:.1f}'} | "
              f"{'-' if dms is None else f'{dms:.1f}'} | {gpu:.0f} | {cores:.1f} |")
    print(f"\n(cores per H100 = GPU samples/s x worker CPU-s per sample; the pinned copy of the batch in the "
          f"main process and the device stage are not worker time. Goals: <= {CORES_GOAL} cores, "
          f"<= {H2D_GOAL / 1e9:.0f} GB/s host-to-device per GPU.)")
    for mode, name, cpu, b, dms, gpu in rows:
        if name in ("shards", "cache"):
            ok_c, ok_b = gpu * cpu <= CORES_GOAL, gpu * b <= H2D_GOAL
            print(f"goal {mode}/{name}: {gpu * cpu:.1f} cores ({'met' if ok_c else 'NOT met'}), "
                  f"{gpu * b / 1e9:.1f} GB/s ({'met' if ok_b else 'NOT met'})")
    print("8-GPU node: multiply cores and GB/s by 8 (a DGX H100 has 14 cores per GPU; storage must deliver "
          "the cache rows at 8 x the per-GPU rate, or the node's page cache must hold the hot set).")


if __name__ == "__main__":
    main()
