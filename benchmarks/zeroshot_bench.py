"""Encode-once zero-shot scoring vs a per-prompt re-encoding loop: image forwards and wall time.

fvlm's suite runs one image forward per case (all anatomy embeddings at once) and one
text forward per distinct prompt. The common alternative (CT-CLIP's zero-shot script)
runs the model on (volume, [positive, negative]) for every diagnosis and prompt pair,
re-encoding the volume each time. Both compute the *same* pairwise-softmax scores; this
script checks that they agree and reports forwards and seconds.

    python benchmarks/zeroshot_bench.py                       # tiny random FVLM on synthetic CT
    python benchmarks/zeroshot_bench.py --cases 16 --taxonomy fvlm54
    python benchmarks/zeroshot_bench.py --checkpoint CKPT --data SHARDS --taxonomy fvlm54 --cases 8

Baselines: ``per_pair`` (one image forward per case x diagnosis x (positive, negative)
pair, what a CT-CLIP-style loop over the prompt ensemble does) and ``per_diagnosis``
(one image forward per case x diagnosis, reused over that diagnosis' prompts).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _build_synthetic(args):
    import torch  # noqa: F401

    from fvlm.data.ct import SampleOptions, make_batch_fn
    from fvlm.data.synthetic_ct import SyntheticCTSource
    from fvlm.models import create_model

    organs = ["lung", "heart", "liver", "kidney", "spleen", "aorta"]
    shape = [int(s) for s in args.shape]
    src = SyntheticCTSource(n=args.cases, anatomies=organs, shape=shape, crop_shape=[s // 2 for s in shape],
                            val_fraction=0.0, seed=0)
    model = create_model("fvlm", {"anatomies": organs, "embed_dim": 64,
                                  "image": {"encoder": args.encoder, "img_size": shape, "patch_size": [8, 8, 4]},
                                  "text": {"model_dir": "tiny-random"}}).eval()
    make_batch = make_batch_fn(SampleOptions(anatomies=organs, volume_size=shape, crop_size=None))
    return model, src, make_batch, src.case_ids()[: args.cases]


def _build_checkpoint(args):
    from fvlm.eval import loading

    model, meta, make_batch = loading.load_model(args.checkpoint, args.device)
    ds = loading.open_shards(args.data)
    return model, ds, make_batch, ds.case_ids()[: args.cases]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a consolidated checkpoint (default: a tiny random FVLM)")
    ap.add_argument("--data", help="shards for --checkpoint")
    ap.add_argument("--taxonomy", default="fvlm54", help="taxonomy whose prompts are scored (default fvlm54)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", nargs=3, default=[32, 32, 16], help="synthetic volume shape")
    ap.add_argument("--encoder", default="vit3d_tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-per-pair", action="store_true", help="time only the per-diagnosis baseline")
    args = ap.parse_args(argv)

    import torch

    from fvlm.eval.embed import encode_cases
    from fvlm.eval.prompts import build_prompt_sets, encode_prompt_sets, model_logit_scale, score
    from fvlm.taxonomy import load_taxonomy

    torch.manual_seed(0)
    model, ds, make_batch, ids = (_build_checkpoint if args.checkpoint else _build_synthetic)(args)
    tax = load_taxonomy(args.taxonomy)
    names = set(getattr(model, "names", []))
    sets = [ps for ps in build_prompt_sets(tax) if not names or ps.embedding in names]
    scale = model_logit_scale(model)
    pairs = sum(len(ps.positives) * len(ps.negatives) for ps in sets)
    print(f"{len(ids)} cases, {len(sets)} scorable diagnoses of {args.taxonomy}, {pairs} prompt pairs; "
          f"torch threads {torch.get_num_threads()}")

    n_img = {"n": 0}
    orig = model.encode_image

    def counted(batch):
        n_img["n"] += 1
        return orig(batch)

    model.encode_image = counted
    records = {c: ds.get(c) for c in ids}  # read once up front so both sides time the model only

    class _Mem:
        def get(self, c, **kw):
            return records[c]

    rows = []
    with torch.inference_mode():
        # warm-up (allocator, kernels), not counted
        orig(make_batch([records[ids[0]]]))
        model.encode_text(["warm up"], anatomy=None)

        t0 = time.perf_counter()
        n_img["n"] = 0
        emb = encode_cases(model, _Mem(), ids, make_batch)
        pe = encode_prompt_sets(model, sets)
        once = np.stack([score(emb.arrays[ps.embedding], pe.positives[ps.diagnosis], pe.negatives[ps.diagnosis],
                               "pairwise", scale) for ps in sets], 1)
        rows.append(("fvlm encode-once", n_img["n"], time.perf_counter() - t0))

        def loop(per_pair: bool):
            out = np.zeros((len(ids), len(sets)))
            for i, c in enumerate(ids):
                for j, ps in enumerate(sets):
                    vals = []
                    img = None
                    for p in ps.positives:
                        for q in ps.negatives:
                            if img is None or per_pair:
                                img = model.encode_image(make_batch([records[c]]))[ps.embedding]
                            txt = model.encode_text([p, q], anatomy=ps.text_anatomy)
                            logits = scale * (img.float() @ txt.float().T)[0]
                            vals.append(float(torch.softmax(logits.double(), 0)[0]))
                    out[i, j] = np.mean(vals)
            return out

        for name, per_pair in (("per-diagnosis re-encode", False), ("per-prompt-pair re-encode", True)):
            if per_pair and args.skip_per_pair:
                continue
            n_img["n"] = 0
            t0 = time.perf_counter()
            s = loop(per_pair)
            rows.append((name, n_img["n"], time.perf_counter() - t0))
            diff = float(np.max(np.abs(s - once)))
            print(f"{name}: max |score difference| vs encode-once = {diff:.2e}")

    base_f, base_t = rows[0][1], rows[0][2]
    print()
    print(f"| method | image forwards | forwards/case | wall s | forwards ratio | time ratio |")
    print("|---|---|---|---|---|---|")
    for name, f, t in rows:
        print(f"| {name} | {f} | {f / len(ids):.1f} | {t:.2f} | {f / base_f:.1f}x | {t / base_t:.1f}x |")
    worst = rows[-1]
    ok = worst[1] / base_f >= 20
    print(f"\nratio of forwards ({worst[0]} / encode-once): {worst[1] / base_f:.1f}x "
          f"({'meets' if ok else 'below'} the >= 20x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
