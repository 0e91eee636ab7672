"""Pretraining step-time benchmark: data / forward / backward / optimizer split, samples/s, peak memory.

Each configuration runs as its own ``python -m fvlm.train`` job (so peak RSS is per run and
DeepSpeed starts fresh), with a fixed number of steps; the first ``--warmup`` steps are dropped
from the averages (one-off costs: JIT, text-feature cache fill, allocator warm-up).

    python benchmarks/pretrain_bench.py                 # tiny config on CPU: 1 vs 2 processes
    python benchmarks/pretrain_bench.py --gpu           # + ViT-B 3D (352x256x112, 1232 tokens), bf16

Prints a Markdown table; ``--json FILE`` also writes the rows.
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
    rows = [x for x in rows if int(x["step"]) > warmup]

    def mean(k):
        return sum(float(x[k]) for x in rows) / max(1, len(rows))

    res = {"config": name, "processes": nproc, "steps": len(rows),
           "data_ms": 1e3 * mean("time/data"), "forward_ms": 1e3 * mean("time/forward"),
           "backward_ms": 1e3 * mean("time/backward"), "optimizer_ms": 1e3 * mean("time/optimizer"),
           "samples_per_s": mean("samples_per_s"),
           "peak_rss_mb": max(float(x["mem/peak_rss_mb"]) for x in rows) if rows else float("nan"), "wall_s": wall,
           "final_loss": float(rows[-1]["loss"]) if rows else float("nan")}
    if rows and rows[-1].get("mem/peak_gpu_mb"):
        res["peak_gpu_mb"] = max(float(x["mem/peak_gpu_mb"]) for x in rows)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--procs", default="1,2", help="process counts for the CPU configs")
    p.add_argument("--configs", default="tiny-cpu", help="comma-separated CPU configs")
    p.add_argument("--gpu", action="store_true", help="also run the ViT-B 3D bf16 configuration (needs CUDA)")
    p.add_argument("--set", action="append", default=[], help="extra --set for every run")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    extra = sum((["--set", s] for s in a.set), [])
    results = []
    for name in a.configs.split(","):
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
