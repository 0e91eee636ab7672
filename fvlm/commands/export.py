"""``fvlm export``: a consolidated checkpoint -> a model directory (config.json + model.safetensors + card)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import FvlmError
from ..models.model_dir import _written_by_export, aside_name, check_export_target, write_model_dir

HELP = "write a shareable model directory: config.json, model.safetensors, text-model files or reference, README card"
DESCRIPTION = (HELP + ". fvlm.load(DIR) and every --checkpoint flag take the directory; loading it never unpickles. "
               "Format: docs/FORMATS.md 'Model directory'.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model.pt of `fvlm pretrain` (or a model directory)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--results", metavar="RESULTS.json",
                   help="results.json of `fvlm zeroshot` for this checkpoint: measured numbers for the model card")
    p.add_argument("--include-text-model", action="store_true",
                   help="copy the text model's files (config, tokenizer, safetensors weights) into DIR/text "
                        "(default: a reference by name and config hash; the tiny test model needs none)")
    p.add_argument("--overwrite", action="store_true",
                   help="write DIR even if it holds files `fvlm export` did not write: the old folder is moved "
                        "aside to DIR.replaced-<time>, never deleted (default: refuse such a folder; an empty "
                        "one, or one an earlier export wrote, is fine)")


def _fmt(v) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def model_card(obj: dict, checkpoint: str, results: dict | None) -> str:
    """The README.md stub of a model directory (facts from the checkpoint; measured numbers from results)."""
    meta, cfg = obj["meta"], obj["config"]
    img = cfg.get("image") or {}
    text = meta.get("text_identity") or {}
    pre = meta.get("preprocess") or {}
    lines = [f"# fvlm model: {meta.get('model_name') or obj['model']}", "",
             "Fine-grained vision-language model for 3D CT (fvlm). Load it offline with",
             "", "```python", "import fvlm", "model = fvlm.load(\"path/to/this/folder\")",
             "emb = model.embed(\"scan.nii.gz\", mask=\"seg.nii.gz\")", "```", "",
             "## Model", "",
             f"- registry name: `{obj['model']}`, mode `{cfg.get('mode')}`, embedding size {meta.get('embed_dim')}",
             f"- image encoder: `{img.get('encoder')}`, input {img.get('img_size')}, patch {img.get('patch_size')}",
             f"- text encoder: {text.get('name') or 'unknown'} (weights {meta.get('text_weights')})",
             f"- anatomies ({len(meta.get('anatomies') or [])}): {', '.join(meta.get('anatomies') or [])}",
             f"- anatomy set: {meta.get('anatomy_set')}; taxonomy: {meta.get('taxonomy')}",
             f"- training step: {meta.get('step')}; loss: {meta.get('loss')}; fvlm {meta.get('fvlm_version')}",
             f"- exported from `{Path(checkpoint).name}` on {time.strftime('%Y-%m-%d')}", "",
             "## Training data", "",
             "_Fill in: which corpus (and licence), how many studies and patients, which split was held out._", "",
             f"- preprocessing settings carried: {'yes' if pre else 'no (older checkpoint: predict uses defaults)'}",
             ""]
    lines += ["## Measured results", ""]
    if results:
        zs = results.get("zeroshot") or {}
        macro = (zs.get("macro") or {}).get("overall") or {}
        auc = macro.get("auc") or {}
        ci = auc.get("ci") or [None, None]
        lines += [f"Zero-shot on `{(results.get('data') or {}).get('path')}` "
                  f"({(results.get('protocol') or {}).get('statement', '')}):", "",
                  f"- macro AUC {_fmt(auc.get('value'))} (95% CI {_fmt(ci[0])}-{_fmt(ci[1])}) "
                  f"over {(zs.get('macro') or {}).get('n_diagnoses')} diagnoses", "",
                  "| diagnosis | anatomy | AUC | threshold |", "|---|---|---|---|"]
        for did, d in sorted((zs.get("diagnoses") or {}).items()):
            a = (d.get("auc") or {}) if isinstance(d.get("auc"), dict) else {"value": d.get("auc")}
            if a.get("value") is None:  # per-diagnosis metrics may sit in a test block
                a = ((d.get("test") or {}).get("auc") or {})
            lines.append(f"| {did} | {d.get('anatomy', '')} | {_fmt(a.get('value'))} | {_fmt(d.get('threshold'))} |")
    else:
        lines.append("_None given (`fvlm export --results results.json` adds the zero-shot numbers)._")
    lines += ["", "## Intended use", "", "Research only; not a medical device.", ""]
    return "\n".join(lines)


def run(args) -> int:
    from ..eval import loading, predict, report   # torch-backed: loaded when the command runs
    from ..models import checkpoint

    src = loading.check_checkpoint_path(args.checkpoint)
    out = Path(args.out)
    if out.resolve() == src.resolve() or src.resolve().is_relative_to(out.resolve()):
        raise FvlmError(f"--out {out}: holds the checkpoint itself; choose another folder")
    check_export_target(out, args.overwrite)
    sha = loading.checkpoint_sha256(str(src))
    obj = checkpoint.read_consolidated(src)
    extra = {}
    sc = predict.read_thresholds_sidecar(src, sha)
    if sc is not None:
        extra["thresholds"] = {"values": dict(sc.thresholds),
                               "scoring": {"rule": sc.rule, "prompts": sc.prompts, "logit_scale": sc.logit_scale,
                                           "clip_baseline": sc.clip_baseline}}
    results = None
    if args.results:
        results = report.read_results(args.results)
        ck = (results.get("checkpoint") or {}).get("sha256")
        if ck and ck != sha:
            raise FvlmError(f"--results {args.results} was computed for another checkpoint (sha256 {ck[:12]}...)")
    card = model_card({**obj, "meta": {**obj["meta"], **extra}}, str(src), results)
    files = {"results.json": json.dumps(results, ensure_ascii=False, indent=1) + "\n"} if results is not None else {}
    aside = aside_name(out) if out.is_dir() and any(out.iterdir()) and not _written_by_export(out)[0] else None
    write_model_dir(obj, out, source={"checkpoint": str(src), "sha256": sha}, card=card,
                    include_text_model=args.include_text_model, extra_meta=extra, extra_files=files,
                    overwrite=args.overwrite, aside=aside)
    n = len(obj["state_dict"])
    print(f"wrote {out}/ (config.json, model.safetensors with {n} tensors, README.md"
          f"{', text/' if args.include_text_model else ''}"
          f"{'; thresholds from ' + sc.source if sc is not None else ''})"
          f"{f'; its earlier contents are kept in {aside}/' if aside is not None else ''}")
    return 0
