"""Quick validation during pretraining: retrieval recall and zero-shot AUC on the validation split.

Uses the evaluation suite's metric code (:mod:`fvlm.eval.metrics`); the full suite
(thresholds, bootstrap, probes) is ``fvlm zeroshot`` on a saved model.

Metrics (all means over names / diagnoses that can be scored):

- ``val/R@1_<name>``, ``val/R@5_<name>``, ``val/recall@1_mean``: image->text retrieval among the
  validation cases where the anatomy is present and has text (a text identical to the
  query's own counts as correct, so repeated "X is normal." does not penalise);
- ``val/auc_<diagnosis>``, ``val/auc_mean``: AUC of the zero-shot score of ``fvlm zeroshot``
  (the same function, :func:`fvlm.eval.prompts.score_prompt_sets`, the taxonomy's prompts and
  the ``pairwise`` rule with the model's logit scale by default) on the diagnosis' own anatomy
  embedding (global for whole-scan diagnoses; every diagnosis on global for a global-only
  model, and diagnoses whose anatomy the model lacks are not scored); rows with an absent
  anatomy or an uncertain label (-1) are left out.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from ..data.ct import SampleOptions, prepare_batch, read_batch
from ..devices import module_device
from ..errors import ConfigError
from ..eval.metrics import recall_at_k, roc_auc
from ..eval.prompts import GLOBAL, build_prompt_sets, encode_prompt_sets, model_logit_scale, score_prompt_sets
from ..splits import resolve_split_ids
from ..taxonomy import Diagnosis, load_taxonomy

__all__ = ["quick_validate", "diagnosis_prompts", "check_val_config"]

_log = logging.getLogger("fvlm.train")


def diagnosis_prompts(diagnoses: Sequence[Diagnosis | dict]) -> list[dict]:
    """Normalise taxonomy diagnoses / dicts to ``{id, anatomy, pos: [...], neg: [...]}`` with prompts."""
    return [{"id": d.id, "anatomy": d.anatomy, "pos": list(d.prompts_positive), "neg": list(d.prompts_negative)}
            for d in map(Diagnosis.of, diagnoses) if d.prompts_positive and d.prompts_negative]


@torch.no_grad()
def quick_validate(model, source, case_ids: Sequence[str], opts: SampleOptions, diagnoses: Sequence[Any] = (),
                   batch_size: int = 16, source_anatomies: Sequence[str] | None = None,
                   rule: str = "pairwise", logit_scale: float | None = None) -> dict[str, float]:
    """Encode the validation cases once and compute the metrics above.

    ``rule`` and ``logit_scale`` (None = the model's learned scale) are ``scoring.rule`` and
    ``scoring.logit_scale`` of ``fvlm zeroshot`` (defaults equal configs/eval/zeroshot.yaml).
    """
    enc = _encode_cases(model, source, case_ids, opts, batch_size, source_anatomies)
    if enc is None:
        return {}
    img, txt, vmask, present, y_all = enc
    metrics = _retrieval(img, txt, vmask)
    metrics.update(_zero_shot_aucs(model, img, present, y_all, opts, diagnoses, rule, logit_scale))
    return metrics


def _encode_cases(model, source, case_ids, opts, batch_size, source_anatomies):
    """``(img, txt, valid, present, labels)``: per-name ``(N, E)`` embeddings, ``(N,)`` masks, ``(N, D)``."""
    names, dev = list(model.names), module_device(model)
    embs: dict[str, list] = {n: [] for n in names}
    txts: dict[str, list] = {n: [] for n in names}
    valid: dict[str, list] = {n: [] for n in names}
    present, labels = [], []
    for i in range(0, len(case_ids), batch_size):
        # the training input of these cases (the same host and device stages as a training batch)
        batch = prepare_batch(read_batch(source, case_ids[i:i + batch_size], opts, source_anatomies=source_anatomies),
                              opts, dev)
        out = model(batch)
        for n in names:
            embs[n].append(out["image"][n].float().cpu())
            txts[n].append(out["text"][n].float().cpu())
            valid[n].append(out["valid"][n].cpu())
        present.append(batch["present"].cpu())
        labels.append(batch["labels"].cpu())
    if not labels:
        return None
    cat = {k: {n: torch.cat(v[n]).numpy() for n in names} for k, v in (("i", embs), ("t", txts), ("v", valid))}
    pres = torch.cat(present).numpy()
    pres_by_name = {a: pres[:, j] for j, a in enumerate(opts.anatomies)}
    return cat["i"], cat["t"], cat["v"], pres_by_name, torch.cat(labels).numpy()


def _retrieval(img, txt, vmask) -> dict[str, float]:
    metrics, r1 = {}, []
    for n in img:
        v = vmask[n].astype(bool)
        if int(v.sum()) < 2:
            continue
        i_, t_ = img[n][v], txt[n][v]
        sim = i_ @ t_.T
        pos = np.isclose(t_ @ t_.T, (t_ * t_).sum(1)[:, None], atol=1e-5) | np.eye(len(t_), dtype=bool)
        r = recall_at_k(sim, ks=(1, 5), positives=pos)
        metrics[f"val/R@1_{n}"], metrics[f"val/R@5_{n}"] = r["R@1"], r["R@5"]
        r1.append(r["R@1"])
    if r1:
        metrics["val/recall@1_mean"] = float(np.mean(r1))
    return metrics


def _zero_shot_aucs(model, img, present, y_all, opts, diagnoses, rule, logit_scale) -> dict[str, float]:
    """The suite's scores (:func:`fvlm.eval.prompts.score_prompt_sets`) on the diagnoses' own embedding;
    rows with an absent anatomy or an uncertain label (-1) left out, as ``fvlm zeroshot`` does."""
    diags = [d for d in map(Diagnosis.of, diagnoses) if d.id in opts.diagnoses
             and d.prompts_positive and d.prompts_negative]
    if not diags:
        return {}
    sets = build_prompt_sets({"diagnoses": diags}, "taxonomy", clip_baseline=set(img) == {GLOBAL})
    sets = [ps for ps in sets if ps.embedding in img]
    if not sets:
        return {}
    pe = encode_prompt_sets(model, sets)
    scale = logit_scale if logit_scale is not None else model_logit_scale(model)
    scores = score_prompt_sets(img, sets, pe, rule, scale)
    metrics, aucs = {}, []
    for ps in sets:
        y = y_all[:, opts.diagnoses.index(ps.diagnosis)]
        keep = y >= 0
        if ps.anatomy != GLOBAL and ps.anatomy in present:
            keep &= present[ps.anatomy].astype(bool)
        a = roc_auc(y[keep] > 0, scores[ps.diagnosis][keep]) if keep.sum() > 1 else float("nan")
        if np.isfinite(a):
            metrics[f"val/auc_{ps.diagnosis}"] = float(a)
            aucs.append(float(a))
    if aucs:
        metrics["val/auc_mean"] = float(np.mean(aucs))
    return metrics


def _config_diagnoses(cfg, source) -> list[dict]:
    """Diagnoses with prompts that validation can score: the taxonomy's, else the source's own."""
    if cfg.data.taxonomy:
        diags = list(load_taxonomy(cfg.data.taxonomy).diagnoses)
    else:
        diags = list(getattr(source, "diagnoses", []) or [])
    scored = diagnosis_prompts(diags)
    if cfg.data.diagnoses:
        scored = [d for d in scored if d["id"] in set(cfg.data.diagnoses)]
    return scored


def check_val_config(cfg, source) -> list[str]:
    """Validation case ids for a PretrainConfig and its opened source; raise where ``train.val_metric``
    cannot be computed.

    The split is ``data.val_split`` under the aliases of :mod:`fvlm.splits` (``valid`` finds shards
    written as ``val``), capped at ``val.max_cases``. With no ``train.val_metric`` a missing split
    only logs a warning (validation off); with one, every way it could never be computed is a
    :class:`ConfigError` naming the key to set: validation disabled, no cases in the split, no
    diagnoses with prompts (``data.taxonomy``) for ``val/auc_*``, an unknown metric name.
    """
    metric = cfg.train.val_metric
    if not cfg.val.enabled:
        if metric:
            raise ConfigError(f"train.val_metric={metric} needs validation, but val.enabled=false")
        return []
    name, ids = resolve_split_ids(source, cfg.data.val_split)
    if not ids:
        msg = (f"no cases in validation split '{cfg.data.val_split}' (data.val_split, or its aliases "
               f"val/valid/validation/dev) of the data")
        if metric:
            raise ConfigError(f"train.val_metric={metric}: {msg}")
        _log.warning("validation off: %s", msg)
        return []
    if name != cfg.data.val_split:
        _log.info("data.val_split %r: using split %r of the data", cfg.data.val_split, name)
    ids = ids[:cfg.val.max_cases]
    if metric:
        _check_metric(metric, cfg, source)
    return ids


def _check_metric(metric: str, cfg, source) -> None:
    anats = list(cfg.data.anatomies) or list(cfg.model.anatomies) or list(getattr(source, "anatomies", []))
    if metric.startswith("val/auc_"):
        diags = _config_diagnoses(cfg, source)
        if not diags:
            raise ConfigError(f"train.val_metric={metric} needs diagnoses with prompts: set data.taxonomy "
                              f"(e.g. fvlm54, ctrate18); the data has none of its own")
        did = metric[len("val/auc_"):]
        if did != "mean" and did not in {d["id"] for d in diags}:
            raise ConfigError(f"train.val_metric={metric}: no diagnosis {did!r} with prompts in "
                              f"{'data.taxonomy=' + str(cfg.data.taxonomy) if cfg.data.taxonomy else 'the data'}")
        return
    if metric == "val/recall@1_mean":
        return
    for pre in ("val/R@1_", "val/R@5_"):
        if metric.startswith(pre):
            n = metric[len(pre):]
            if n != "global" and n not in anats:
                raise ConfigError(f"train.val_metric={metric}: anatomy {n!r} is not trained "
                                  f"(data.anatomies: {', '.join(anats) or 'none'})")
            return
    raise ConfigError(f"train.val_metric={metric}: unknown metric (val/auc_mean, val/auc_<diagnosis>, "
                      f"val/recall@1_mean, val/R@1_<anatomy>, val/R@5_<anatomy>)")
