"""X-ray MAE benchmark: step time, peak memory and tokens/s vs resolution, encoder size, checkpointing.

Each configuration runs in its own process (so its peak RSS is its own):
one MAE training step (forward, backward, AdamW) on random images after a warm-up step,
context-aware masking at 0.95 inside / 0.85 outside a central box (about 88 % hidden).

Measured on this machine (CPU): median step time, tokens/s (visible encoder tokens per
second), peak RSS growth over the built model. Also measured, on PyTorch's meta device
(shapes only, no arithmetic, so it works for ViT-L at 1280 here): the bytes autograd
saves for backward, i.e. the activation memory of one image. The GPU projection is
``16 B x params`` (fp32 weights + grads + two AdamW moments) + ``B x activations`` with
bf16 activations (half the fp32 bytes), plus the recomputed block and the checkpointed
block inputs when gradient checkpointing is on. It is a projection, not a GPU measurement.

    python benchmarks/xray_bench.py                # table to stdout and benchmarks/results/xray_bench.md
    python benchmarks/xray_bench.py --sizes 512 --encoders tiny --no-run-base
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DECODERS = {"nano": (128, 2, 4), "tiny": (256, 4, 8), "small": (256, 4, 8), "base": (512, 8, 16),
            "large": (512, 8, 16)}


def _build(enc: str, size: int, ckpt: bool, device=None):
    import torch

    from fvlm.models.xray_mae import XrayMAE

    dd, dl, dh = DECODERS[enc]
    m = XrayMAE(f"vit2d_{enc}", img_size=size, patch_size=16, decoder_dim=dd, decoder_depth=dl,
                decoder_heads=dh, grad_checkpointing=ckpt)
    return m.to("meta") if device == "meta" else m


def _batch(size: int, batch: int, device=None):
    import torch

    from fvlm.xray import masking

    g = size // 16
    inside = masking.box_region((g, g))[None].expand(batch, -1)
    s = masking.context_aware_masking(inside, 0.95, 0.85, torch.Generator().manual_seed(0))
    x = torch.rand(batch, 1, size, size) if device != "meta" else torch.empty(batch, 1, size, size, device="meta")
    keep, mask = (s.keep, s.mask) if device != "meta" else (s.keep.to("meta"), s.mask.to("meta"))
    return x, keep, mask


def saved_activation_bytes(enc: str, size: int, ckpt: bool) -> dict:
    """Bytes saved for backward (one image, fp32), counted on the meta device."""
    import torch

    from fvlm.losses.mae import MAELoss

    model = _build(enc, size, ckpt, device="meta").train()
    x, keep, mask = _batch(size, 1, device="meta")
    seen: dict = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else id(t)
        except Exception:
            key = id(t)
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, keep=keep)
        MAELoss((16, 16))(out["pred"], x, mask)
    act = sum(seen.values())
    k = keep.shape[1] + model.encoder.num_prefix_tokens
    e, depth = model.encoder.embed_dim, model.encoder.depth
    extra = 0
    if ckpt:  # block inputs kept by checkpointing + one block recomputed at a time in backward
        n_dec = model.grid_size[0] * model.grid_size[1] + model.encoder.num_prefix_tokens
        dd, dl, _ = DECODERS[enc]
        no_ck = saved_activation_bytes(enc, size, False)["act_bytes"]
        extra = 4 * (depth * k * e + dl * n_dec * dd) + no_ck // max(1, depth + dl)
    params = sum(p.numel() for p in model.parameters())
    return {"act_bytes": act + extra, "params": params, "enc_tokens": k}


def run_one(enc: str, size: int, ckpt: bool, steps: int, batch: int) -> dict:
    import resource

    import torch

    from fvlm.losses.mae import MAELoss

    torch.manual_seed(0)
    model = _build(enc, size, ckpt).train()
    loss_fn = MAELoss((16, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, keep, mask = _batch(size, batch)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(x, keep=keep)
        loss_fn(out["pred"], x, mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": batch * keep.shape[1] / t, "rss_peak_mb": peak / 1024,
            "rss_growth_mb": (peak - base_rss) / 1024, "threads": torch.get_num_threads()}


def project_gpu_gb(params: int, act_bytes: int, batch: int) -> float:
    return (16 * params + batch * act_bytes / 2) / 1024 ** 3 * 1.1  # +10 % allocator/workspace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1280])
    ap.add_argument("--encoders", nargs="+", default=["tiny", "base"])
    ap.add_argument("--project", nargs="+", default=["base", "large"], help="encoders projected for GPU at 1280")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gpu-batch", type=int, default=16, help="per-GPU batch for the projection")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per measured configuration")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "xray_bench.md"))
    ap.add_argument("--one", nargs=3, metavar=("ENC", "SIZE", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        enc, size, ck = args.one
        print(json.dumps(run_one(enc, int(size), ck == "1", args.steps, args.batch)))
        return 0

    rows = []
    for enc in args.encoders:
        for size in args.sizes:
            for ck in (False, True):
                meta = saved_activation_bytes(enc, size, ck)
                cmd = [sys.executable, __file__, "--one", enc, str(size), "1" if ck else "0",
                       "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
                    res = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
                        "error": p.stderr.strip().splitlines()[-1][:80]}
                except subprocess.TimeoutExpired:
                    res = {"error": f"over {args.timeout} s"}
                row = {"encoder": enc, "size": size, "ckpt": ck, **meta, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    proj = []
    for enc in args.project:
        for ck in (False, True):
            m = saved_activation_bytes(enc, 1280, ck)
            proj.append({"encoder": enc, "ckpt": ck, **m,
                         "gpu_gb_b1": project_gpu_gb(m["params"], m["act_bytes"], 1),
                         "gpu_gb_bN": project_gpu_gb(m["params"], m["act_bytes"], args.gpu_batch)})
            print(json.dumps(proj[-1]), flush=True)

    lines = ["# X-ray MAE benchmark (CPU here; GPU memory projected)", "",
             f"Batch {args.batch}, patch 16, context-aware masking 0.95/0.85 on a central box; "
             f"median of {args.steps} steps after one warm-up; torch threads "
             f"{next((r['threads'] for r in rows if 'threads' in r), '?')}.", "",
             "| encoder | size | grad ckpt | params (M) | enc tokens | step (s) | tokens/s | RSS growth (MB) "
             "| saved activations / image (MB, fp32) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            meas = f"{r['error']} | - | -"
        else:
            meas = f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['rss_growth_mb']:.0f}"
        lines.append(f"| ViT-{r['encoder']} | {r['size']} | {'on' if r['ckpt'] else 'off'} | {r['params'] / 1e6:.1f} "
                     f"| {r['enc_tokens']} | {meas} | {r['act_bytes'] / 2 ** 20:.0f} |")
    lines += ["", f"Projected GPU memory at 1280 x 1280 (bf16 activations, fp32 AdamW state, +10 %), "
                  f"per GPU, batch 1 and {args.gpu_batch}:", "",
              f"| encoder | grad ckpt | params (M) | activations / image (MB, fp32) | GB at batch 1 "
              f"| GB at batch {args.gpu_batch} |", "|---|---|---|---|---|---|"]
    for r in proj:
        lines.append(f"| ViT-{r['encoder']} | {'on' if r['ckpt'] else 'off'} | {r['params'] / 1e6:.1f} "
                     f"| {r['act_bytes'] / 2 ** 20:.0f} | {r['gpu_gb_b1']:.1f} | {r['gpu_gb_bN']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
