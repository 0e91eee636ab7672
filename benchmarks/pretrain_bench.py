"""Pretraining step-time benchmark: data / forward / backward / optimizer split, samples/s, peak memory.

Each configuration runs as its own ``python -m fvlm.train`` job (so peak RSS is per run and
DeepSpeed starts fresh), with a fixed number of steps; the first ``--warmup`` steps are dropped
from the averages (one-off costs: JIT, text-feature cache fill, allocator warm-up).

    python benchmarks/pretrain_bench.py                 # tiny config on CPU: 1 vs 2 processes
    python benchmarks/pretrain_bench.py --gpu           # + ViT-B 3D (352x256x112, 1232 tokens), bf16
    python benchmarks/pretrain_bench.py --loss          # the loss alone, 2 gloo processes: per-name vs packed

Prints a Markdown table; ``--json FILE`` also writes the rows.

``--loss`` compares, in one run with two real gloo processes, the fine-grained loss as it was
before issue 16 (``tests/loss_reference.py``: four all-gathers and a host sync per name) with the
current one (one packed all-gather per step), for K anatomies (+ global): collectives per step
(counted by wrapping ``torch.distributed``), ms per forward+backward, and the ratio. It also
prints what the collective count means at 8 GPUs, where each NCCL all-gather costs at least its
launch latency whatever its size.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "tiny-cpu": ["--config", "train/tiny.yaml"],
    "tiny-cpu-bf16": ["--config", "train/tiny.yaml", "--set", "train.precision=bf16"],
    # the default model (nano ViT, 64x64x32 volumes, 512 tokens, frozen MiniLM), batch 16
    "default-cpu": ["--set", "data.batch_size=16", "--set", "train.threads=2"],
    "vitb3d-gpu-bf16": ["--config", "train/vitb3d_gpu.yaml", "--set", "data.synthetic={n: 64, shape: [352, 256, 112]}",
                        "--set", "data.shards=null", "--set", "data.num_workers=4", "--set", "data.batch_size=4"],
}
CONFIGS["vitb3d-gpu-bf16-zero3"] = CONFIGS["vitb3d-gpu-bf16"] + ["--set", "train.deepspeed_config=deepspeed/zero3.json"]
GPU_CHECK = ("vitb3d-gpu-bf16", "vitb3d-gpu-bf16-zero3")


def run_one(name: str, nproc: int, steps: int, warmup: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"fvlm_bench_{name}_"))
    args = ["-m", "fvlm.train", *CONFIGS[name], "--out", str(out), "--set", f"train.steps={steps}",
            "--set", "train.log_every=1", "--set", "train.ckpt_every=0", "--set", "val.enabled=false",
            "--set", "train.tensorboard=false", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29600 + os.getpid() % 300)] + args
    else:
        cmd = [sys.executable] + args
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name} x{nproc} failed:\n{r.stderr[-3000:]}")
    rows = [x for x in csv.DictReader(open(out / "metrics.csv")) if x.get("loss")]
    losses = [float(x["loss"]) for x in rows]
    rows = [x for x in rows if int(x["step"]) > warmup]

    def mean(k):
        return sum(float(x[k]) for x in rows) / max(1, len(rows))

    res = {"config": name, "processes": nproc, "steps": len(rows),
           "data_ms": 1e3 * mean("time/data"), "forward_ms": 1e3 * mean("time/forward"),
           "backward_ms": 1e3 * mean("time/backward"), "optimizer_ms": 1e3 * mean("time/optimizer"),
           "samples_per_s": mean("samples_per_s"),
           "peak_rss_mb": max(float(x["mem/peak_rss_mb"]) for x in rows) if rows else float("nan"), "wall_s": wall,
           "final_loss": float(rows[-1]["loss"]) if rows else float("nan"),
           # loss over the first and the last 5 logged steps (a check that the run learns at all)
           "loss_first5": sum(losses[:5]) / max(1, len(losses[:5])),
           "loss_last5": sum(losses[-5:]) / max(1, len(losses[-5:]))}
    if rows and rows[-1].get("mem/peak_gpu_mb"):
        res["peak_gpu_mb"] = max(float(x["mem/peak_gpu_mb"]) for x in rows)
    return res


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce", "barrier")


def _loss_inputs(k: int, batch: int, dim: int, seed: int):
    """One rank's per-name embeddings (leaves), validity, text refs and labels; ``k`` anatomies + global."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    names = [f"an{i}" for i in range(k)] + ["global"]
    out = {"image": {}, "text": {}, "valid": {}, "text_ref": {}, "logit_scale": torch.tensor(14.0)}
    for n in names:
        out["image"][n] = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
        out["text"][n] = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
        out["valid"][n] = torch.rand(batch, generator=g) > 0.2
        out["text_ref"][n] = torch.randn(batch, 32, generator=g)
    batch_d = {"status": torch.randint(0, 3, (batch, k), generator=g),
               "global_status": torch.randint(0, 3, (batch,), generator=g),
               "labels": torch.randint(-1, 2, (batch, 18), generator=g).float()}
    return names[:-1], out, batch_d


def _loss_worker(rank: int, world: int, port: int, spec: dict, result_file: str):
    import time as _time

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "tests"))
    from loss_reference import per_name_loss

    from fvlm.losses import FineGrainedContrastiveLoss, LossConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = {"n": 0}

    def counting(fn):
        def wrapper(*a, **kw):
            counts["n"] += 1
            return fn(*a, **kw)
        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, counting(getattr(dist, name)))
    rows = []
    for k in spec["ks"]:
        anats, out, batch = _loss_inputs(k, spec["batch"], spec["dim"], seed=1000 * k + rank)
        cfg = LossConfig(calibration=["normal", "disease"], anatomy_weighting="count")
        loss = FineGrainedContrastiveLoss(cfg, anats, {a: [i % 18] for i, a in enumerate(anats)})
        fns = {"per-name (before #16)": lambda o, b: per_name_loss(loss, o, b), "packed (now)": loss}
        for label, fn in fns.items():
            for rep in range(spec["warmup"] + spec["reps"]):
                if rep == spec["warmup"]:
                    dist.barrier()
                    counts["n"] = 0
                    t0 = _time.perf_counter()
                total, _ = fn(out, batch)
                total.backward()
            dist.barrier()
            dt = (_time.perf_counter() - t0) / spec["reps"]
            rows.append({"K": k, "loss": label, "collectives_per_step": (counts["n"] - 1) / spec["reps"],
                         "ms_per_step": 1e3 * dt, "total": float(total.detach())})
    if rank == 0:
        Path(result_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def loss_bench(ks=(4, 16), batch: int = 32, dim: int = 512, reps: int = 20, warmup: int = 3,
               world: int = 2) -> list[dict]:
    """Old vs new loss in ``world`` real gloo processes; rows per (K, loss) with their ratios."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as td:
        res = str(Path(td) / "loss.json")
        spec = {"ks": list(ks), "batch": batch, "dim": dim, "reps": reps, "warmup": warmup}
        mp.spawn(_loss_worker, args=(world, port, spec, res), nprocs=world, join=True)
        rows = json.loads(Path(res).read_text())
    for k in ks:
        old, new = [r for r in rows if r["K"] == k]
        for r in (old, new):
            r["speedup_vs_per_name"] = old["ms_per_step"] / r["ms_per_step"]
            r["collective_ratio"] = old["collectives_per_step"] / r["collectives_per_step"]
    return rows


def print_loss_table(rows: list[dict], world: int, batch: int, dim: int) -> None:
    print(f"Loss only, {world} gloo processes, {batch} rows/rank, E={dim}, forward+backward "
          "(collectives counted on rank 0; the barrier closing the timing excluded)")
    print("| K anatomies | loss | collectives/step | ms/step | speed-up vs per-name | fewer collectives |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['loss']} | {r['collectives_per_step']:.0f} | {r['ms_per_step']:.1f} | "
              f"{r['speedup_vs_per_name']:.2f}x | {r['collective_ratio']:.0f}x |")
    lat_us = 30.0     # a small NCCL all-gather across 8 GPUs: launch + ring latency, typically 20-50 us
    for k in sorted({r["K"] for r in rows}):
        old, new = [r for r in rows if r["K"] == k]
        print(f"K={k}: at 8 GPUs, {old['collectives_per_step']:.0f} collectives x ~{lat_us:.0f} us latency = "
              f"{old['collectives_per_step'] * lat_us / 1e3:.2f} ms/step of pure latency (plus "
              f"{k + 1} host syncs that stall the CUDA stream), vs {new['collectives_per_step']:.0f} x "
              f"{lat_us:.0f} us = {new['collectives_per_step'] * lat_us / 1e3:.2f} ms")


def gpu_check(steps: int, warmup: int, extra: list[str]) -> int:
    """ViT-B/3D bf16 under ZeRO-2 and ZeRO-3 on one GPU: samples/s, MFU, peak memory, loss drop.

    Exit 1 without CUDA (one line) or when a run's loss does not fall over ``steps`` steps.
    """
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).parent))
    from loader_bench import H100_BF16_PEAK, vitb_flops

    flops, lines = vitb_flops()
    extra = ["--set", "train.warmup_steps=5", *extra]   # the config's 1000-step warm-up would hide learning
    rows = [run_one(name, 1, steps, warmup, extra) for name in GPU_CHECK]
    print(f"GPU: {torch.cuda.get_device_name(0)}; {steps} steps, first {warmup} left out of the averages")
    print("| config | samples/s | MFU (989 TFLOP/s bf16) | peak GPU MB | peak RSS MB | loss first 5 | loss last 5 |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        mfu = r["samples_per_s"] * flops / H100_BF16_PEAK
        ok &= r["loss_last5"] < r["loss_first5"]
        print(f"| {r['config']} | {r['samples_per_s']:.1f} | {mfu:.1%} | {r.get('peak_gpu_mb', float('nan')):.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['loss_first5']:.4f} | {r['loss_last5']:.4f} |")
    print("ZeRO-3 / ZeRO-2 samples/s: " f"{rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x")
    print("MFU arithmetic (image tower only):")
    for line in lines:
        print("  " + line)
    if not ok:
        print("gpu_check: the loss did not fall in every run", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--procs", default="1,2", help="process counts for the CPU configs")
    p.add_argument("--configs", default="tiny-cpu", help="comma-separated CPU configs")
    p.add_argument("--gpu", action="store_true", help="also run the ViT-B 3D bf16 configuration (needs CUDA)")
    p.add_argument("--set", action="append", default=[], help="extra --set for every run")
    p.add_argument("--json", default=None)
    p.add_argument("--loss", action="store_true", help="benchmark the loss alone (2 gloo processes) and stop")
    p.add_argument("--loss-ks", default="4,16", help="anatomy counts for --loss")
    p.add_argument("--loss-reps", type=int, default=20)
    p.add_argument("--loss-batch", type=int, default=32, help="rows per rank for --loss")
    p.add_argument("--gpu-check", action="store_true",
                   help="only the GPU check: ViT-B/3D bf16 under ZeRO-2 and ZeRO-3 (benchmarks/gpu_check.sh)")
    a = p.parse_args(argv)
    if a.gpu_check:
        return gpu_check(a.steps, a.warmup, sum((["--set", s] for s in a.set), []))
    if a.loss:
        rows = loss_bench([int(x) for x in a.loss_ks.split(",")], batch=a.loss_batch, reps=a.loss_reps)
        print_loss_table(rows, 2, a.loss_batch, 512)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        return 0
    extra = sum((["--set", s] for s in a.set), [])
    results = []
    for name in [c for c in a.configs.split(",") if c]:
        for n in [int(x) for x in a.procs.split(",")]:
            results.append(run_one(name, n, a.steps, a.warmup, extra))
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        results.append(run_one("vitb3d-gpu-bf16", 1, a.steps, a.warmup, extra))
    cols = ["config", "processes", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "samples_per_s",
            "peak_rss_mb", "final_loss"]
    if any("peak_gpu_mb" in r for r in results):
        cols.append("peak_gpu_mb")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r.get(c, float('nan')):.1f}" if isinstance(r.get(c, 0.0), float) else str(r[c]) for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
