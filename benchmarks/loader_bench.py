"""Can the shard loader keep a GPU fed? Loader samples/s next to what training consumes.

    python benchmarks/loader_bench.py [--cases 4] [--batches 6] [--small]

Corpus: the synthetic CT-RATE-sized case (``benchmarks/ctrate_case.py``: 512 x 512 x 300 at
0.7 x 0.7 x 1.5 mm) preprocessed once with the default config (v2 shards, default codec) and
stored ``--cases`` times (``--small``: the shipped example_ct instead). The loader is
``fvlm.data.loader.make_loader`` over a ``CTStream`` (read, cut, resize, window in workers):

- crop mode: all 15 anatomies of fvlm15 cut and resized to ``CROP`` while read;
- volume mode: the whole volume fitted (aspect kept) into the ViT-B/3D input ``VITB_INPUT``.

Printed next to (a) the tiny CPU config's measured training-step rate (``configs/train/tiny.yaml``,
measured here, in process, one thread) and (b) what one ViT-B/3D training step at the fVLM
input size consumes on an H100-class GPU, from FLOPs per sample at 40 % of bf16 peak
(arithmetic printed), and the loader cores per GPU that the measured rate implies.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BLOSC_NTHREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctrate_case import ctrate_case, shipped_cases  # noqa: E402

CROP = [96, 96, 48]
VITB_INPUT = (352, 256, 112)     # configs/model/fvlm_vitb.yaml
VITB_PATCH = (32, 16, 16)
H100_BF16_PEAK = 989e12          # dense bf16 FLOP/s (H100 SXM)
MFU = 0.40
TINY_INPUT = (32, 32, 16)        # configs/train/tiny.yaml data.volume_size
TINY_SPACING = (11.4, 9.5, 21.0)  # the shipped 366 x 303 x 336 mm CT on a ~32 x 32 x 16 grid


def vitb_flops() -> tuple[float, list[str]]:
    """Training FLOPs per sample of the ViT-B/3D image tower, with the arithmetic."""
    L, d = 12, 768
    N = 1
    for s, p in zip(VITB_INPUT, VITB_PATCH):
        N *= s // p
    per_layer = N * (24 * d * d + 4 * N * d)  # qkv + proj 4d^2 and MLP 8d^2 MACs = 24d^2 FLOP; QK^T + AV 4Nd FLOP
    embed = 2 * N * (VITB_PATCH[0] * VITB_PATCH[1] * VITB_PATCH[2]) * d
    fwd = L * per_layer + embed
    train = 4 * fwd                               # forward + backward (2x) + recompute (grad checkpointing on)
    lines = [f"tokens N = {' * '.join(str(s // p) for s, p in zip(VITB_INPUT, VITB_PATCH))} = {N}",
             f"per layer = N (24 d^2 + 4 N d) = {N} * (24*{d}^2 + 4*{N}*{d}) = {per_layer / 1e9:.2f} GFLOP",
             f"patch embed = 2 N * {VITB_PATCH[0]}*{VITB_PATCH[1]}*{VITB_PATCH[2]} * d = {embed / 1e9:.2f} GFLOP",
             f"forward = 12 layers + embed = {fwd / 1e9:.0f} GFLOP; training step = 4 x forward "
             f"(fwd + 2x bwd + checkpoint recompute) = {train / 1e9:.0f} GFLOP/sample",
             f"H100 bf16 peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s x {MFU:.0%} = {H100_BF16_PEAK * MFU / 1e12:.0f} TFLOP/s "
             f"-> {H100_BF16_PEAK * MFU / train:.0f} samples/s per GPU (text tower frozen, not counted)"]
    return train, lines


def build_corpus(root: Path, n: int, small: bool, tiny: bool = False) -> None:
    from fvlm.anatomy import load_anatomy_set
    from fvlm.data.shards import write_dataset_info, write_index, write_shard
    from preprocess.config import PreprocessConfig
    from preprocess.inputs import CaseSpec
    from preprocess.writer import build_layout, case_record

    cfg = PreprocessConfig()
    cfg.reports.labeler = False
    image, mask = (shipped_cases()[0][1:] if small or tiny else ctrate_case())
    if tiny:  # the shipped CT stored at about the tiny config's input size (~32 x 32 x 16 voxels)
        cfg.target_spacing_mm = list(TINY_SPACING)
        cfg.whole.shape = list(TINY_INPUT)
    aset = load_anatomy_set(cfg.anatomy_set)
    layout = build_layout(cfg, aset)
    rec = case_record(CaseSpec(case_id="x", image=image, mask=mask), cfg, aset, layout)
    rec.report = {"findings": "The lungs are clear.", "impressions": "", "report": ""}
    recs = []
    for i in range(n):
        r = type(rec)(**{**vars(rec), "case_id": f"c{i}", "patient_id": f"p{i}", "split": "train"})
        recs.append(r)
    write_shard(root / "shards/000-00000.h5", layout, recs, n=n)
    write_index(root / "index.jsonl", [{"case_id": r.case_id, "patient_id": r.patient_id, "split": "train",
                                        "shard": "shards/000-00000.h5", "row": i,
                                        "anatomies": [a for a in layout.anatomies if r.present[a]]}
                                       for i, r in enumerate(recs)])
    write_dataset_info(root, layout, {"anatomy_set": aset.name})


def loader_rate(root: Path, mode: str, workers: int, batches: int, batch_size: int,
                volume_size=VITB_INPUT) -> float:
    from fvlm.data import ShardDataset
    from fvlm.data.ct import CTStream, SampleOptions
    from fvlm.data.loader import make_loader

    ds = ShardDataset(root)
    opts = SampleOptions(anatomies=ds.anatomies, volume_size=list(volume_size) if mode == "volume" else None,
                         crop_size=CROP if mode == "crop" else None)
    stream = CTStream(ds, ds.case_ids(), opts, batch_size=batch_size, seed=0)
    it = iter(make_loader(stream, num_workers=workers, prefetch_factor=2))
    next(it)  # start-up (worker start, file open) outside the timing
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return batches * batch_size / dt


def tiny_step_rate(steps: int = 8) -> float:
    """Samples/s of the tiny CPU config's training step (forward + backward + AdamW), in process."""
    import torch

    from fvlm.config import load_config
    from fvlm.data.ct import CTStream
    from fvlm.train.pretrain import PretrainConfig, prepare

    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, files=["train/tiny.yaml"], base="train/default.yaml")
    source, opts, model, loss_fn, _ = prepare(cfg)
    stream = CTStream(source, source.case_ids(cfg.data.train_split), opts, cfg.data.batch_size, seed=0)
    batches = [stream.make(b) for b in range(steps + 2)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for k, batch in enumerate(batches):
        if k == 2:
            t0 = time.perf_counter()
        loss, _ = loss_fn(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * cfg.data.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="shipped example_ct instead of the CT-RATE-sized case")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs (shared with other jobs while measured: rates are lower bounds)")
    with tempfile.TemporaryDirectory(prefix="fvlm_loader_") as d:
        root = Path(d)
        build_corpus(root, args.cases, args.small)
        rows = {}
        for mode in ("crop", "volume"):
            for w in (0, 1, 2):
                rows[mode, w] = loader_rate(root, mode, w, args.batches, args.batch_size)
                print(f"{mode} mode, {w} workers: {rows[mode, w]:.2f} samples/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="fvlm_loader_tiny_") as d:
        # what the tiny CPU config consumes: volume mode at its 32 x 32 x 16 input, batch 8
        root = Path(d)
        build_corpus(root, 8, small=True, tiny=True)
        for w in (0, 1, 2):
            rows["tiny volume", w] = loader_rate(root, "volume", w, 4 * args.batches, 8, volume_size=TINY_INPUT)
            print(f"tiny-input volume mode, {w} workers: {rows['tiny volume', w]:.2f} samples/s", flush=True)
    tiny = tiny_step_rate()
    train, lines = vitb_flops()
    gpu = H100_BF16_PEAK * MFU / train
    print("\nViT-B/3D consumption on one H100-class GPU:")
    for ln in lines:
        print("  " + ln)
    print(f"\ntiny CPU config training step (train/tiny.yaml, 1 thread): {tiny:.1f} samples/s\n")
    print("| mode | workers | loader samples/s | / tiny step rate | / ViT-B GPU rate | per-core rate | "
          "loader cores per H100 |")
    print("|---|---|---|---|---|---|---|")
    for (mode, w), r in rows.items():
        per_core = r / max(1, w)
        vitb = ("-", "-") if mode.startswith("tiny") else (f"{r / gpu:.3f}", f"{gpu / per_core:.0f}")
        print(f"| {mode} | {w} | {r:.2f} | {r / tiny:.2f}x | {vitb[0]} | {per_core:.2f} | {vitb[1]} |")
    print(f"\n(per-core rate: samples/s divided by the worker count, 0 workers = the main process; "
          f"cores per GPU = {gpu:.0f} samples/s / per-core rate; crop / volume: the CT-RATE-sized case "
          f"(--small: example_ct) at the ViT-B/3D input sizes; tiny volume: example_ct stored on a "
          f"{TINY_SPACING} mm grid and read at the tiny config's {TINY_INPUT}, the row to set against the "
          f"tiny step rate)")
    ratio = rows["tiny volume", 2] / tiny
    need = gpu / rows["volume", 2] * 2
    print(f"goal: 2 workers >= 5x the tiny step rate: {ratio:.2f}x ({'met' if ratio >= 5 else 'NOT met'}); "
          f"goal: <= 4 loader cores per H100 (volume mode, ViT-B/3D): {need:.0f} ({'met' if need <= 4 else 'NOT met'})")


if __name__ == "__main__":
    main()
