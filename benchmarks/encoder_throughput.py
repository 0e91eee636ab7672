"""Encoder forward+backward throughput and peak memory on this machine.

For the tiny and base 2D/3D encoders: tokens/s of a training step (forward +
backward), with SDPA attention versus a plain softmax(QK^T)V implementation
measured in the same run, and with/without gradient checkpointing. Each
configuration runs in its own subprocess so its peak RSS is its own.

    python benchmarks/encoder_throughput.py [--quick] [--threads N]

Prints a table and the ratios SDPA/plain (speed) and checkpointing/none (memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    # name: (encoder, input size, patch size, batch)
    "3d_tiny": ("vit3d_tiny", (128, 128, 64), (16, 16, 8), 2),
    "3d_base": ("vit3d_base", (128, 128, 64), (16, 16, 8), 1),
    "2d_tiny": ("vit2d_tiny", (224, 224), (16, 16), 4),
    "2d_base": ("vit2d_base", (224, 224), (16, 16), 2),
}


def _child(spec: dict) -> dict:
    import resource

    import torch

    from fvlm.encoders import create_encoder

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    enc = create_encoder(spec["encoder"], img_size=tuple(spec["size"]), patch_size=tuple(spec["patch"]),
                         attn_impl=spec["attn"], grad_checkpointing=spec["ckpt"])
    enc.train()
    x = torch.randn(spec["batch"], 1, *spec["size"])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(spec["warmup"] + spec["iters"]):
        t0 = time.perf_counter()
        enc.forward_features(x).float().pow(2).mean().backward()
        enc.zero_grad(set_to_none=True)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = sorted(times)[len(times) // 2]
    tokens = spec["batch"] * enc.num_patches
    return {"step_s": step, "tokens_per_s": tokens / step, "peak_rss_mb": peak / 1024,
            "step_rss_mb": (peak - base_rss) / 1024, "tokens": enc.num_patches,
            "params_m": sum(p.numel() for p in enc.parameters()) / 1e6}


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny encoders only, fewer iterations")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    names = [n for n in CONFIGS if not (args.quick and n.endswith("base"))]
    iters = 2 if args.quick else 3
    rows = []
    print(f"encoder throughput, {args.threads} threads; forward+backward of one training step\n")
    print(f"| config | params (M) | tokens | attention | grad ckpt | step (s) | tokens/s | peak RSS (MB) | step RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        enc, size, patch, batch = CONFIGS[name]
        res = {}
        for attn in ("sdpa", "math"):
            for ckpt in (False, True):
                if attn == "math" and ckpt:
                    continue
                spec = dict(encoder=enc, size=size, patch=patch, batch=batch, attn=attn, ckpt=ckpt,
                            threads=args.threads, warmup=1, iters=iters)
                r = run(spec)
                res[(attn, ckpt)] = r
                if "error" in r:
                    print(f"| {name} | | | {attn} | {ckpt} | error: {r['error']} | | |")
                    continue
                print(f"| {name} | {r['params_m']:.1f} | {r['tokens'] * batch} | {attn} | {'yes' if ckpt else 'no'} "
                      f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['step_rss_mb']:.0f} |", flush=True)
        rows.append((name, res))
    print("\nstep RSS = peak RSS minus the RSS after building the model and input (activations + grads).")
    print("ratios (same run; on a loaded machine, repeat and compare ratios, not seconds):")
    print("| config | SDPA / plain speed-up | ckpt / no-ckpt step time | ckpt / no-ckpt step RSS (activations) |")
    print("|---|---|---|---|")
    for name, res in rows:
        a, b, c = res.get(("sdpa", False), {}), res.get(("math", False), {}), res.get(("sdpa", True), {})
        if all("step_s" in r for r in (a, b, c)):
            print(f"| {name} | {b['step_s'] / a['step_s']:.2f}x | {c['step_s'] / a['step_s']:.2f}x "
                  f"| {c['step_rss_mb'] / max(a['step_rss_mb'], 1e-9):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
