"""Inference time and memory of the dense heads: per CT volume (3D) and per image (2D).

Each configuration runs in a fresh subprocess (so peak RSS is its own): builds the
model (random weights: speed does not depend on them), runs ``--warmup`` + ``--repeats``
predictions and reports the median seconds and the peak memory (CUDA: max allocated;
CPU: peak RSS of the process, which includes Python and torch, ~300 MB).

- 3D: the shipped abdomen CT (122 x 101 x 112 voxels at 3 mm) by sliding windows of the
  encoder's input size, as `fvlm dense eval` does.
- 2D: one 224 x 224 (tiny) / 224 x 224 (base) radiograph-sized image, one window.
- heads: ``seg`` (15 anatomy classes) and ``text`` (15 prompts; text embeddings are
  precomputed and excluded, as the prompt bank caches them).

    python benchmarks/dense_bench.py                 # all, CPU (or CUDA if present)
    python benchmarks/dense_bench.py --only 3d_tiny --heads seg --out bench.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    # name: (encoder, img_size, patch_size, head widths)
    "3d_tiny": ("vit3d_tiny", [64, 64, 32], [8, 8, 4], dict(base_channels=64, min_channels=16, stem_channels=16)),
    "3d_base": ("vit3d_base", [128, 128, 64], [16, 16, 8], dict(base_channels=256, min_channels=32, stem_channels=32)),
    "2d_tiny": ("vit2d_tiny", [224, 224], [16, 16], dict(base_channels=64, min_channels=16, stem_channels=16)),
    "2d_base": ("vit2d_base", [224, 224], [16, 16], dict(base_channels=256, min_channels=32, stem_channels=32)),
}


def child(name: str, head: str, warmup: int, repeats: int, threads: int) -> dict:
    import resource

    import numpy as np
    import torch

    from fvlm.config import build
    from fvlm.dense.config import ModelConfig
    from fvlm.models.dense import build_dense_model, sliding_predict

    if threads:
        torch.set_num_threads(threads)
    enc, img, patch, widths = CONFIGS[name]
    cfg = build(ModelConfig, {"encoder": enc, "img_size": img, "patch_size": patch, "head": head, **widths})
    classes = [f"c{i}" for i in range(15)]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_dense_model(cfg, classes, text_dim=384 if head == "text" else None).to(dev).eval()
    if len(img) == 3:
        import nibabel as nib

        from fvlm.data import window
        from fvlm.resources import samples_dir

        hu = np.asarray(nib.load(samples_dir() / "ct" / "example_ct.nii.gz").dataobj, dtype=np.float32)
        x = torch.from_numpy(window(hu))[None, None].to(dev)
    else:
        x = torch.rand(1, 1, *img, device=dev)
    text = torch.randn(15, 1, 384, device=dev) if head == "text" else None
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = sliding_predict(model, x, img, text=text, overlap=0.25, sw_batch_size=2)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    mem = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": name, "head": head, "encoder": enc, "img_size": img, "input": list(x.shape[2:]),
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "seconds_median": round(float(np.median(times)), 4), "seconds_min": round(float(min(times)), 4),
            "peak_mb": round(mem, 1), "mem_kind": "cuda max allocated" if dev.type == "cuda" else "peak RSS",
            "head_params_m": round(sum(p.numel() for p in model.head.parameters()) / 1e6, 3),
            "encoder_params_m": round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 3),
            "out_shape": list(out.shape)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--heads", nargs="*", default=["seg", "text"], choices=["seg", "text"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--out", help="write the Markdown table here (and a .json next to it)")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "HEAD"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.warmup, a.repeats, a.threads)))
        return 0
    rows = []
    for name in a.only:
        for head in a.heads:
            cmd = [sys.executable, __file__, "--child", name, head, "--warmup", str(a.warmup),
                   "--repeats", str(a.repeats), "--threads", str(a.threads)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if p.returncode:
                    rows.append({"config": name, "head": head, "error": p.stderr.strip().splitlines()[-1][:200]})
                else:
                    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                rows.append({"config": name, "head": head, "error": f"timeout after {a.timeout} s"})
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines = ["| config | head | encoder | input | device | s / volume or image (median) | peak MB | memory | "
             "head params (M) | encoder params (M) |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['head']} | error: {r['error']} |" + " |" * 7)
            continue
        lines.append(f"| {r['config']} | {r['head']} | {r['encoder']} | {'x'.join(map(str, r['input']))} | "
                     f"{r['device']} | {r['seconds_median']:.3f} | {r['peak_mb']:.0f} | {r['mem_kind']} | "
                     f"{r['head_params_m']:.2f} | {r['encoder_params_m']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(table)
        with open(os.path.splitext(a.out)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
