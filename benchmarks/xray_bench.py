"""X-ray MAE benchmark: step time, peak memory and tokens/s vs resolution, encoder size, checkpointing.

Each configuration runs in its own process (so its peak RSS is its own):
one MAE training step (forward, backward, AdamW) on random images after a warm-up step,
context-aware masking at 0.95 inside / 0.85 outside a central box (about 88 % hidden).

Measured on this machine (CPU): median step time, tokens/s (visible encoder tokens per
second), peak RSS growth over the built model (activations + grads + AdamW state; the
baseline includes the transient peak of model construction, so it reads low for big
models). The activation memory is *estimated* from the transformer shapes
(:func:`activation_bytes`); with the grads and AdamW state added, it is within ~15 % of the
measured RSS growth for the tiny encoder and above it for base (conservative). The GPU projection is
``16 B x params`` (fp32 weights + grads + two AdamW moments) + ``B x activations`` in
bf16, +10 %. It is a projection, not a GPU measurement.

    python benchmarks/xray_bench.py                # table to stdout and benchmarks/results/xray_bench.md
    python benchmarks/xray_bench.py --sizes 512 --encoders tiny --steps 1
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


def _build(enc: str, size: int, ckpt: bool):
    import torch

    from fvlm.models.xray_mae import XrayMAE

    dd, dl, dh = DECODERS[enc]
    m = XrayMAE(f"vit2d_{enc}", img_size=size, patch_size=16, decoder_dim=dd, decoder_depth=dl,
                decoder_heads=dh, grad_checkpointing=ckpt)
    return m


def _batch(size: int, batch: int):
    import torch

    from fvlm.xray import masking

    g = size // 16
    inside = masking.box_region((g, g))[None].expand(batch, -1)
    s = masking.context_aware_masking(inside, 0.95, 0.85, torch.Generator().manual_seed(0))
    return torch.rand(batch, 1, size, size), s.keep, s.mask


def activation_bytes(enc: str, size: int, ckpt: bool, bytes_per_value: int = 2) -> dict:
    """Activation memory of one image for backward, from the transformer shapes.

    Per block and token a pre-norm ViT block keeps about ``34 / 2 x C`` values with a fused
    (flash / memory-efficient) attention kernel that does not store the T x T matrix
    (Korthikanti et al. 2022, without the dropout masks we do not use). Encoder blocks see
    the visible tokens, decoder blocks all N tokens. With checkpointing only block inputs
    (``C`` values per token and block) stay, plus one block recomputed at a time. On this CPU
    the fp32 estimate plus grads and AdamW state is within ~15 % of the measured RSS growth
    of the tiny configurations, and above it for base.
    """
    from fvlm.encoders import encoder_defaults
    from fvlm.xray import masking

    d = encoder_defaults(f"vit2d_{enc}")
    c, depth = d["embed_dim"], d["depth"]
    dd, dl, _ = DECODERS[enc]
    g = size // 16
    inside = masking.box_region((g, g))[None]
    k = masking.context_aware_masking(inside, 0.95, 0.85).keep.shape[1] + 1
    n = g * g + 1
    per_tok = 17  # values kept per token and channel by one block
    enc_blk, dec_blk = per_tok * k * c, per_tok * n * dd
    if ckpt:
        vals = depth * k * c + dl * n * dd + max(enc_blk, dec_blk)
    else:
        vals = depth * enc_blk + dl * dec_blk
    vals += 4 * n * 16 * 16  # patch targets, predictions and their gradients
    mlp = 4 * c * c * 2 + 3 * c * c + 4 * c * c  # qkv, proj, fc1, fc2 weights per encoder block
    params = depth * mlp + dl * (12 * dd * dd) + c * dd + 256 * dd + 256 * c
    return {"act_bytes": vals * bytes_per_value, "params_est": params, "enc_tokens": k}


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


def _count_params(enc: str) -> int:
    m = _build(enc, 224, False)
    return sum(p.numel() for p in m.parameters())


def project_gpu_gb(params: int, act_bytes: int, batch: int) -> float:
    """fp32 weights + grads + 2 AdamW moments (16 B/param), bf16 activations, +10 % workspace."""
    return (16 * params + batch * act_bytes) / 1024 ** 3 * 1.1


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
                meta = activation_bytes(enc, size, ck, bytes_per_value=4)
                cmd = [sys.executable, __file__, "--one", enc, str(size), "1" if ck else "0",
                       "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
                    res = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
                        "error": p.stderr.strip().splitlines()[-1][:80]}
                except subprocess.TimeoutExpired:
                    res = {"error": f"over {args.timeout} s"}
                row = {"encoder": enc, "size": size, "ckpt": ck, **meta, "params": _count_params(enc), **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    proj = []
    for enc in args.project:
        for ck in (False, True):
            m = activation_bytes(enc, 1280, ck, bytes_per_value=2)
            m["params"] = _count_params(enc)
            proj.append({"encoder": enc, "ckpt": ck, **m,
                         "gpu_gb_b1": project_gpu_gb(m["params"], m["act_bytes"], 1),
                         "gpu_gb_bN": project_gpu_gb(m["params"], m["act_bytes"], args.gpu_batch)})
            print(json.dumps(proj[-1]), flush=True)

    lines = ["# X-ray MAE benchmark (CPU here; GPU memory projected)", "",
             f"Batch {args.batch}, patch 16, context-aware masking 0.95/0.85 on a central box; "
             f"median of {args.steps} steps after one warm-up; torch threads "
             f"{next((r['threads'] for r in rows if 'threads' in r), '?')}.", "",
             "| encoder | size | grad ckpt | params incl. decoder (M) | visible enc tokens | step (s) | enc tokens/s | RSS growth (MB) "
             "| est. activations / image (MB, fp32) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            meas = f"{r['error']} | - | -"
        else:
            meas = f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['rss_growth_mb']:.0f}"
        lines.append(f"| ViT-{r['encoder']} | {r['size']} | {'on' if r['ckpt'] else 'off'} | {r['params'] / 1e6:.1f} "
                     f"| {r['enc_tokens']} | {meas} | {r['act_bytes'] / 2 ** 20:.0f} |")
    lines += ["", f"Projected GPU memory at 1280 x 1280 (bf16 activations, fp32 AdamW state, +10 %), "
                  f"per GPU, batch 1 and {args.gpu_batch}:", "",
              f"| encoder | grad ckpt | params (M) | activations / image (MB, bf16) | GB at batch 1 "
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
