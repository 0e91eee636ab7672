"""Evaluation of dense models (``fvlm dense eval``): per-class Dice/IoU, grounding.

Writes ``dense_eval.json`` (``fvlm-dense-eval`` v1, docs/FORMATS.md "Dense eval
results") and ``dense_eval.md`` (the same numbers as Markdown tables).

- ``seg`` models: argmax over background + classes, sliding windows over whole volumes
  (3D) or whole axial slices (2D).
- ``text`` models: one prompt per class (its phrase, or ``eval.paraphrases``), mask =
  sigmoid > ``eval.threshold``; classes are marked seen/unseen in training.
- cases with findings (demo lesions): pointing game and Dice/IoU of the finding text's
  heatmap against the lesion mask, with the pointing game's chance level and a one-sided
  binomial p-value of the hits against it.
- ``eval.crops``: ``whole`` scores whole volumes; ``organ`` scores one crop of the model's
  input size per case and finding anatomy, centred on that organ (:func:`eval_cases`).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

import torch

from ..errors import FvlmError
from ..models.dense import sliding_predict
from .data import DenseCase, anatomy_crops
from .metrics import (SegmentationMeter, binary_dice_iou, confusion_counts, dice_iou_from_counts, nanmean,
                      pointing_chance, pointing_game, pointing_p_value, _num)
from .task import PromptBank

__all__ = ["predict_case", "prompt_heatmaps", "eval_cases", "evaluate_model", "write_eval", "markdown_report",
           "FORMAT_NAME", "FORMAT_VERSION", "body_mask"]

FORMAT_NAME = "fvlm-dense-eval"
FORMAT_VERSION = 1
log = logging.getLogger("fvlm.dense")


def _roi(model) -> tuple:
    return tuple(model.encoder.img_size)


def _inputs(model, case: DenseCase):
    """The case as a batch for the model: ``(1, 1, X, Y, Z)`` for 3D, ``(Z, 1, X, Y)`` for 2D (axial slices)."""
    v = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
    if model.spatial_dims == 3:
        return v[None, None]
    return v.permute(2, 0, 1)[:, None]


def _outputs(model, logits):
    """Back to ``(K, X, Y, Z)``."""
    if model.spatial_dims == 3:
        return logits[0]
    return logits.permute(1, 2, 3, 0)


def predict_case(model, case: DenseCase, overlap: float = 0.25, sw_batch_size: int = 2) -> np.ndarray:
    """``seg`` model: the predicted label map ``(X, Y, Z)`` (uint8) of one case."""
    logits = sliding_predict(model, _inputs(model, case), _roi(model), overlap=overlap, sw_batch_size=sw_batch_size)
    return _outputs(model, logits).argmax(0).numpy().astype(np.uint8)


def prompt_heatmaps(model, case_or_image, text_emb, overlap: float = 0.25, sw_batch_size: int = 2) -> np.ndarray:
    """``text`` model: sigmoid heatmaps ``(K, X, Y, Z)`` (3D or stacked slices) for prompt embeddings ``(K, T, E)``."""
    case = case_or_image if isinstance(case_or_image, DenseCase) else DenseCase("image", case_or_image, None)
    logits = sliding_predict(model, _inputs(model, case), _roi(model), text=text_emb, overlap=overlap,
                             sw_batch_size=sw_batch_size)
    return torch.sigmoid(_outputs(model, logits)).numpy()


def body_mask(image: np.ndarray, level: float = 0.2) -> np.ndarray:
    """Voxels brighter than ``level`` of the windowed image (~ -850 HU in the default window): the body."""
    from scipy import ndimage as ndi

    m = image > level
    return ndi.binary_fill_holes(m) if m.ndim == 2 else m


def eval_cases(model, cases: Sequence[DenseCase], crops: str = "whole") -> list[DenseCase]:
    """The cases scored under ``eval.crops``: the volumes themselves (``whole``), or (``organ``)
    :func:`fvlm.dense.data.anatomy_crops` of the model's input size, one per case and finding anatomy."""
    if crops == "whole":
        return list(cases)
    if model.spatial_dims != 3:
        raise FvlmError("eval.crops=organ needs a 3D model (crops of model.img_size around each organ); "
                        "use eval.crops=whole for 2D models")
    out = anatomy_crops(cases, model.class_names, _roi(model))
    if not out:
        raise FvlmError(f"eval.crops=organ: no case has a finding in a segmented anatomy "
                        f"({', '.join(model.class_names)}); organ crops need cases with findings (data.source=demo)")
    return out


def _p(v: float) -> float:
    """A p-value for JSON, to 6 significant digits (a small one does not round to 0)."""
    return float(f"{v:.6g}")


def evaluate_model(model, info: dict, cases: Sequence[DenseCase], eval_cfg, text_encoder=None,
                   class_phrases: dict | None = None) -> dict:
    """Per-class Dice/IoU (and grounding metrics when cases have findings) as a JSON-ready dict."""
    names = list(model.class_names)
    meter = SegmentationMeter(names)
    result: dict = {"task": model.task, "classes": names}
    per_case = []
    ground = {"hits": 0, "n": 0, "chance": [], "chance_body": [], "dice": [], "iou": [], "cases": [],
              "control": [], "pool": _control_pool(cases) if eval_cfg.text_control else []}
    bank = None
    if model.task == "text":
        if text_encoder is None:
            raise FvlmError("evaluating a text head needs its text encoder")
        bank = PromptBank(text_encoder, info.get("meta", {}).get("templates", ["{}"]))
        phrases = _class_prompts(names, info, eval_cfg, class_phrases, result)
    for case in cases:
        if model.task == "seg":
            if case.label is None:
                continue
            pred = predict_case(model, case, eval_cfg.overlap, eval_cfg.sw_batch_size)
            d, i = meter.update(pred, case.label, case.case_id)
        else:
            d, i = _text_case_scores(model, bank, case, names, phrases, eval_cfg, meter)
            if case.findings:
                _ground_case(model, bank, case, eval_cfg, ground)
        if d is not None:
            per_case.append({"case_id": case.case_id, "dice": {n: _num(v) for n, v in zip(names, d)},
                             "iou": {n: _num(v) for n, v in zip(names, i)}})
    if meter.case_ids:
        result.update(meter.summary())
    else:
        result.update({"per_class": {}, "mean": {}, "n_cases": 0})
    if model.task == "text" and meter.case_ids:
        for c in names:
            result["per_class"][c]["seen_in_training"] = result["seen_in_training"][c]
        for tag, flag in (("mean_seen", True), ("mean_unseen", False)):
            sel = [v for c, v in result["per_class"].items() if result["seen_in_training"][c] == flag]
            result[tag] = {m: _num(nanmean([v[m] for v in sel])) for m in ("dice", "iou")} if sel else None
    result["cases"] = per_case
    if ground["n"]:
        result["grounding"] = _grounding_summary(ground, info, eval_cfg)
    return result


def _class_prompts(names: list[str], info: dict, eval_cfg, class_phrases: dict | None, result: dict) -> dict:
    """Text head: the prompt of each class (the checkpoint's phrases, ``eval.paraphrases`` over them);
    records prompts, paraphrased classes and which classes training saw in ``result``."""
    phrases = dict(class_phrases or info.get("meta", {}).get("class_phrases", {}))
    for c in names:
        phrases.setdefault(c, c.replace("_", " "))
    phrases.update({k: v for k, v in (eval_cfg.paraphrases or {}).items() if k in names})
    unseen = set(info.get("meta", {}).get("unseen_classes", []))
    result["prompts"] = {c: phrases[c] for c in names}
    result["paraphrased"] = sorted(c for c in names if c in (eval_cfg.paraphrases or {}))
    result["seen_in_training"] = {c: c not in unseen for c in names}
    return phrases


def _text_case_scores(model, bank, case: DenseCase, names: list[str], phrases: dict, eval_cfg,
                      meter: SegmentationMeter) -> tuple:
    """Text head: per-class Dice and IoU of one labelled case (thresholded class-prompt heatmaps),
    added to ``meter``; ``(None, None)`` for a case without a label map."""
    if case.label is None:
        return None, None
    emb = bank([phrases[c] for c in names])
    heat = prompt_heatmaps(model, case, emb, eval_cfg.overlap, eval_cfg.sw_batch_size)
    counts = np.zeros((len(names) + 1, 3), np.int64)
    for k in range(len(names)):
        counts[k + 1] = confusion_counts(heat[k] > eval_cfg.threshold, case.label == k + 1, 2)[1]
    meter.counts += counts
    d, i = dice_iou_from_counts(counts)
    d, i = d[1:], i[1:]
    meter.case_dice.append(d)
    meter.case_iou.append(i)
    meter.case_ids.append(case.case_id)
    return d, i


def _grounding_summary(ground: dict, info: dict, eval_cfg) -> dict:
    """The ``grounding`` section: pointing game against chance, mask Dice/IoU, the text control, and
    the findings whose text training never saw."""
    chance_body = float(np.mean(ground["chance_body"]))
    out = {
        "n_findings": ground["n"], "pointing_hits": ground["hits"],
        "pointing_game": _num(ground["hits"] / ground["n"]),
        "chance": _num(float(np.mean(ground["chance"]))),
        "chance_body": _num(chance_body),
        # against the mean chance: the per-finding chances differ, so this is an approximation
        "p_value_vs_chance": _p(pointing_p_value(ground["hits"], ground["n"], chance_body)),
        "tolerance_voxels": eval_cfg.tolerance, "threshold": eval_cfg.threshold,
        "dice": _num(nanmean(ground["dice"])), "iou": _num(nanmean(ground["iou"])),
        "findings": ground["cases"]}
    if ground["control"]:
        out["text_control"] = _control_summary(ground["control"])
    seen_texts = info.get("meta", {}).get("finding_texts")
    if seen_texts is not None:
        seen_texts = set(seen_texts)
        for row in ground["cases"]:
            row["text_seen_in_training"] = row["text"] in seen_texts
        new = [r for r in ground["cases"] if not r["text_seen_in_training"]]
        hits = sum(int(r["hit"]) for r in new)
        out["unseen_texts"] = {"n_findings": len(new), "pointing_hits": hits,
                               "pointing_game": _num(hits / len(new)) if new else None}
    return out


def _control_pool(cases: Sequence[DenseCase]) -> list[tuple[str, str]]:
    """(anatomy, text) of every finding of the evaluated cases, in a fixed order."""
    return sorted({(f.anatomy, f.text) for c in cases for f in c.findings if f.mask.any()})


def _control_text(f, pool: list[tuple[str, str]], salt: int) -> str | None:
    """A finding text of another anatomy (deterministic): it should not point at ``f``'s lesion."""
    other = [t for a, t in pool if a != f.anatomy]
    return other[salt % len(other)] if other else None


def _control_summary(pairs: list[tuple[bool, bool]]) -> dict:
    """Own-text vs other-anatomy-text pointing hits, with an exact McNemar test (one-sided).

    Discordant pairs only: ``b`` = hit with its own text but not with the control text,
    ``c`` = the reverse; under "the text does not matter" ``b ~ Binomial(b + c, 1/2)``.
    """
    own = sum(a for a, _ in pairs)
    ctl = sum(b for _, b in pairs)
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    p = pointing_p_value(b, b + c, 0.5) if b + c else 1.0  # P(X >= b), X ~ Bin(b + c, 1/2)
    return {"n_findings": len(pairs), "own_text_hits": own, "control_text_hits": ctl,
            "control_pointing_game": _num(ctl / len(pairs)), "discordant_own_only": b, "discordant_control_only": c,
            "p_value_own_vs_control": _p(float(p)),
            "protocol": "each finding's own text vs the text of a finding of another anatomy, same image and "
                        "prompt slots; exact one-sided McNemar test on the discordant pairs"}


def _ground_case(model, bank, case: DenseCase, eval_cfg, acc: dict) -> None:
    texts = [f.text for f in case.findings]
    heat = prompt_heatmaps(model, case, bank(texts), eval_cfg.overlap, eval_cfg.sw_batch_size)
    body = body_mask(case.image)
    control = None
    if acc["pool"]:
        alt = [_control_text(f, acc["pool"], acc["n"] + j) for j, f in enumerate(case.findings)]
        if all(alt):
            # a separate forward with the same number of prompt slots: the class aggregation
            # attends across prompts, so mixing own and control texts in one pass would couple them
            control = prompt_heatmaps(model, case, bank(alt), eval_cfg.overlap, eval_cfg.sw_batch_size)
    for j, (f, h) in enumerate(zip(case.findings, heat)):
        if not f.mask.any():
            continue
        hit = pointing_game(h, f.mask, eval_cfg.tolerance, candidates=body)
        if control is not None:
            acc["control"].append((bool(hit), bool(pointing_game(control[j], f.mask, eval_cfg.tolerance,
                                                                  candidates=body))))
        d, i = binary_dice_iou(h > eval_cfg.threshold, f.mask)
        acc["hits"] += int(hit)
        acc["n"] += 1
        acc["chance"].append(pointing_chance(f.mask, eval_cfg.tolerance))
        acc["chance_body"].append(pointing_chance(f.mask, eval_cfg.tolerance, body))
        acc["dice"].append(d)
        acc["iou"].append(i)
        peak = np.unravel_index(int(np.argmax(np.where(body, h, -np.inf))), h.shape)
        acc["cases"].append({"case_id": case.case_id, "text": f.text, "hit": hit, "dice": _num(d), "iou": _num(i),
                             "peak_voxel": [int(p) for p in peak], "max_heat": _num(float(h.max()))})


def write_eval(result: dict, out_dir: str | Path, checkpoint: str, data: dict, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``dense_eval.json`` + ``dense_eval.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "checkpoint": str(checkpoint), "data": data, **result, **(extra or {})}
    jp = out / "dense_eval.json"
    jp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    mp = out / "dense_eval.md"
    mp.write_text(markdown_report(doc), encoding="utf-8")
    return jp, mp


def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _pf(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def _scored_on(data: dict) -> str:
    if data.get("crops") == "organ":
        size = "×".join(str(s) for s in data.get("crop_size") or [])
        return (f"organ crops: {data.get('n_cases')} crops of {size} voxels, each centred on a finding's anatomy, "
                f"from {data.get('n_volumes')} volumes (Dice per crop)")
    return "whole volumes (sliding windows)"


def _md_table(header: list, row: list) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
            "| " + " | ".join(map(str, row)) + " |"]


def markdown_report(doc: dict) -> str:
    lines = [f"# Dense evaluation ({doc.get('task')})", "",
             f"checkpoint: `{doc.get('checkpoint')}`  ", f"data: {doc.get('data')}  ",
             f"scored on: {_scored_on(doc.get('data') or {})}  ",
             f"cases: {doc.get('n_cases', 0)}", ""]
    pc = doc.get("per_class") or {}
    if pc:
        text = doc.get("task") == "text"
        head = "| class | " + ("prompt | seen | " if text else "") + "Dice | IoU | Dice (pooled) | IoU (pooled) | cases | voxels |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for c, v in pc.items():
            extra = f"{doc['prompts'][c]} | {'yes' if v.get('seen_in_training') else 'no'} | " if text else ""
            lines.append(f"| {c} | {extra}{_f(v['dice'])} | {_f(v['iou'])} | {_f(v['dice_global'])} | "
                         f"{_f(v['iou_global'])} | {v['n_cases']} | {v['support_voxels']} |")
        m = doc.get("mean", {})
        lines += ["", f"mean Dice {_f(m.get('dice'))}, mean IoU {_f(m.get('iou'))} "
                      f"(over classes with a defined score; pooled: Dice {_f(m.get('dice_global'))}, IoU {_f(m.get('iou_global'))})"]
        mp = doc.get("mean_present")
        if mp:
            lines.append(f"mean over the classes present in the targets: Dice {_f(mp.get('dice'))}, "
                         f"IoU {_f(mp.get('iou'))}")
        for tag in ("mean_seen", "mean_unseen"):
            if doc.get(tag):
                lines.append(f"{tag.replace('_', ' ')}: Dice {_f(doc[tag]['dice'])}, IoU {_f(doc[tag]['iou'])}")
        if doc.get("paraphrased"):
            lines.append(f"prompted with a paraphrase (wording not used in training, eval.paraphrases): "
                         f"{', '.join(doc['paraphrased'])}")
    for name, b in (doc.get("baselines") or {}).items():
        lines.append(f"baseline {name}: mean Dice {_f(b.get('dice'))}, mean IoU {_f(b.get('iou'))}")
    g = doc.get("grounding")
    if g:
        lines += ["", "## Grounding", ""]
        lines += _md_table(["findings", "pointing game", "chance (image)", "chance (body)", "p vs body chance",
                            "Dice", "IoU"],
                           [g["n_findings"], f"{_f(g['pointing_game'])} ({g['pointing_hits']}/{g['n_findings']})",
                            _f(g["chance"]), _f(g["chance_body"]), _pf(g.get("p_value_vs_chance")), _f(g["dice"]),
                            _f(g["iou"])])
        lines += ["", "p: one-sided binomial test of the hits against the mean body chance (an approximation: "
                      "the chance differs per finding)"]
        ut = g.get("unseen_texts")
        if ut and ut["n_findings"]:
            lines += ["", f"Finding texts never used in training: {ut['pointing_hits']}/{ut['n_findings']} hits "
                          f"(pointing game {_f(ut['pointing_game'])})."]
        tc = g.get("text_control")
        if tc:
            lines += ["", "Text control (is the text used, or would any finding text point there?):", ""]
            lines += _md_table(["findings", "hits, own text", "hits, other-anatomy text", "own only", "control only",
                                "p (McNemar)"],
                               [tc["n_findings"], tc["own_text_hits"], tc["control_text_hits"],
                                tc["discordant_own_only"], tc["discordant_control_only"],
                                _pf(tc["p_value_own_vs_control"])])
    return "\n".join(lines) + "\n"
