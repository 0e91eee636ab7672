"""The actions of ``fvlm dense`` (train, eval, ground) on a resolved :class:`~fvlm.dense.config.DenseConfig`.

``fvlm/commands/dense.py`` parses the command line and calls these (importing this module only
when the command runs, so ``fvlm --help`` loads no torch).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from .. import encoders
from ..config import dump_config
from ..errors import FvlmError
from ..logs import setup_logging
from ..models.dense import load_dense
from .baselines import baseline_scores
from .data import load_cases
from .evaluate import eval_cases, evaluate_model, write_eval
from .ground import ground_texts, load_image, save_overlays, write_ground_json
from .train import run as train_dense

__all__ = ["train", "evaluate", "ground"]

log = logging.getLogger("fvlm.dense")


def train(cfg, out: str | Path, quiet: bool = False) -> int:
    """``fvlm dense train``: dense.pt and its logs under ``out``; exit code 3 when stopped early."""
    out = Path(out)
    setup_logging(out, "train", quiet=quiet)
    res = train_dense(cfg, out)
    if res["interrupted"]:
        print(f"stopped at step {res['steps']} with a checkpoint; run the same command to resume")
        return 3
    if res["first_loss"] is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {res['checkpoint']} (loss {res['first_loss']:.3f} -> {res['final_loss']:.3f}, "
              f"{res['seconds']:.0f} s)")
    return 0


def _text_encoder(info: dict, cfg):
    """The checkpoint's text encoder (``model.text_model_dir`` or the recorded path), checked by its config hash."""
    ident = info.get("text_model") or {}
    d = cfg.model.text_model_dir or ident.get("path")
    enc = encoders.TextEncoder(d) if d and Path(d).is_dir() else encoders.TextEncoder(cfg.model.text_model_dir)
    if ident.get("config_sha256") and enc.identity.get("config_sha256") != ident.get("config_sha256"):
        raise FvlmError(f"the checkpoint was trained with text model {ident.get('name')} "
                        f"(config sha {ident.get('config_sha256')}), found {enc.identity}; "
                        "set model.text_model_dir to the same model")
    return enc


def _inherit_holdout(data, meta: dict):
    """The shipped sample's evaluation data for a checkpoint trained on it: the held-out slices it was
    trained without (its ``holdout_z`` and ``holdout_gap``), or the second patient when either the
    checkpoint or the command asks for it (a model trained on all of example_ct has no held-out slices)."""
    if data.source != "samples" or meta.get("data_source") != "samples" or "holdout" not in meta:
        return data
    want = "patient" if "patient" in (meta["holdout"], data.holdout) else "slices"
    trained = {"holdout": want, "holdout_z": list(meta["holdout_z"]), "holdout_gap": int(meta["holdout_gap"])}
    for key, val in trained.items():
        if val != getattr(data, key):
            log.info("data.%s %s -> %s (the checkpoint's held-out data)", key, getattr(data, key), val)
            data = dataclasses.replace(data, **{key: val})
    return data


def evaluate(cfg, checkpoint: str, out: str | None, baselines: bool = True, quiet: bool = False) -> int:
    """``fvlm dense eval``: writes dense_eval.json and dense_eval.md under ``out``
    (default ``<checkpoint dir>/eval``); prints a one-line summary."""
    out = Path(out) if out else Path(checkpoint).parent / "eval"
    setup_logging(None, "eval", quiet=quiet, hold=True)
    model, info = load_dense(checkpoint)      # checked before anything is written under --out
    setup_logging(out, "eval", quiet=quiet)
    meta = info.get("meta", {})
    data = dataclasses.replace(cfg.data, classes=list(model.class_names),
                               anatomy_set=meta.get("anatomy_set", cfg.data.anatomy_set))
    # the model was trained on this window and spacing: evaluate on the same input
    trained = {"window": meta.get("window"), "spacing_mm": meta.get("resample_mm")}
    for key, val in trained.items():
        if val is not None and list(val) != list(getattr(data, key)):
            log.info("data.%s %s -> %s (the checkpoint's training input)", key, list(getattr(data, key)), list(val))
            data = dataclasses.replace(data, **{key: list(val)})
    data = _inherit_holdout(data, meta)
    cfg = dataclasses.replace(cfg, data=data, model=info["model_config"])
    dump_config(cfg, out / "config.yaml")
    volumes = load_cases(data, model.class_names, "eval")
    cases = eval_cases(model, volumes, cfg.eval.crops)
    text = _text_encoder(info, cfg) if model.task == "text" else None
    res = evaluate_model(model, info, cases, cfg.eval, text_encoder=text)
    extra = {}
    if baselines and any(c.label is not None for c in cases):
        extra["baselines"] = baseline_scores(load_cases(data, model.class_names, "train"), cases, model.class_names)
    src = {"source": data.source, "root": data.root, "split": "eval" if data.source == "samples" else data.eval_split,
           "n_cases": len(cases), "crops": cfg.eval.crops}
    if cfg.eval.crops == "organ":
        src.update(crop_size=list(model.encoder.img_size), n_volumes=len(volumes))
    if data.source == "samples":
        src["holdout"] = data.holdout
        if data.holdout == "slices":
            src["holdout_z"] = list(data.holdout_z)
    jp, mp = write_eval(res, out, checkpoint, src, extra)
    m = res.get("mean") or {}
    msg = f"wrote {jp} and {mp.name}"
    if m.get("dice") is not None:
        msg += f" (mean Dice {m['dice']:.3f}, IoU {m['iou']:.3f})"
    if res.get("grounding"):
        g = res["grounding"]
        msg += (f"; pointing game {g['pointing_game']:.3f} vs chance {g['chance_body']:.3f} "
                f"(p = {g['p_value_vs_chance']:.3g})")
    print(msg)
    return 0


def ground(cfg, checkpoint: str, image_path: str, texts: list[str], out: str | None) -> int:
    """``fvlm dense ground``: heatmap and overlay PNGs of each text on the image, ground.json."""
    model, info = load_dense(checkpoint)
    if model.task != "text":
        raise FvlmError(f"{checkpoint} holds a '{model.task}' model; grounding needs model.head=text")
    out = Path(out) if out else Path(f"ground_{Path(image_path).name.split('.')[0]}")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    image, affine, iinfo = load_image(image_path, model, info.get("meta", {}))
    heat = ground_texts(model, info, image, texts, _text_encoder(info, cfg), cfg.eval)
    results = [save_overlays(image, h, t, out, affine, iinfo.get("window_hu")) for t, h in zip(texts, heat)]
    write_ground_json(out, image_path, checkpoint, iinfo, results)
    for r in results:
        print(f"{r['text']!r}: peak {r['peak_voxel']} score {r['peak']:.3f} -> {out / r['files']['overlay_png']}")
    return 0
