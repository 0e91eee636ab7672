"""The zero-shot benchmark suite, written against any embedding model.

``run_suite`` needs:

- ``model`` with ``encode_image(batch) -> {"global": (B, E), "<anatomy>": (B, E), ...}``
  and ``encode_text(texts, anatomy=None) -> (N, E)``, both L2-normalised
  (``fvlm.models.checkpoint.load_consolidated`` returns such a model);
- ``dataset`` with ``case_ids(split=None)`` and ``get(case_id, ...) -> CaseRecord``
  (``fvlm.data.shards.ShardDataset``);
- ``make_batch(list[CaseRecord]) -> batch``, the model's input transform;
- a taxonomy (``fvlm.taxonomy.load_taxonomy``).

It encodes each case once (all embeddings from one ``encode_image`` call, cached
on disk), each distinct prompt once, scores every diagnosis on its own anatomy's
embedding (the global one for whole-scan diagnoses and for the CLIP baseline),
tunes thresholds only on non-test cases, bootstraps CIs over test patients, and
adds a linear probe and retrieval. The result is the ``results.json`` document
(schema in docs/FORMATS.md, "Results").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..config import to_dict
from ..errors import FvlmError
from ..logs import get_logger
from ..taxonomy import Taxonomy
from . import probe as probe_mod
from .config import ZeroShotConfig
from .embed import CaseEmbeddings, EmbeddingCache, encode_cases
from .labels import LabelTable, silver_matrix
from .prompts import GLOBAL, build_prompt_sets, encode_prompt_sets, model_logit_scale, score_prompt_sets
from .protocol import CaseInfo, resolve
from .retrieval import run_retrieval
from .scoring import DiagnosisInfo, evaluate, roc_points

log = get_logger("eval.zeroshot")

RESULTS_FORMAT = "fvlm-zeroshot-results"
RESULTS_VERSION = 1


@dataclass
class SuiteOutput:
    """What ``run_suite`` produces: the results document and arrays for the figures."""
    results: dict
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    embeddings: CaseEmbeddings | None = None


def _meta_records(dataset, case_ids: Sequence[str]) -> dict[str, Any]:
    out = {}
    for c in case_ids:
        try:
            out[c] = dataset.get(c, volume=False, crops=False)
        except TypeError:  # a dataset without the lazy flags
            out[c] = dataset.get(c)
    return out


def _include_matrix(sets, emb: CaseEmbeddings, rows: np.ndarray, absent: str) -> np.ndarray:
    """``(n, D)`` bool: does the row count for the diagnosis (its anatomy is in the scan)."""
    inc = np.ones((rows.size, len(sets)), dtype=bool)
    if absent == "exclude":
        for j, ps in enumerate(sets):
            if ps.anatomy != GLOBAL and ps.anatomy in emb.present:
                inc[:, j] = emb.present[ps.anatomy][rows]
    return inc


@dataclass
class _Prompts:
    """The encoded prompts of a run and what scoring them needs."""
    sets: list                  # PromptSet per diagnosis, taxonomy order
    usable: list                # those whose embedding the model produces
    encoded: Any                # encode_prompt_sets(model, usable)
    scale: float
    clip_baseline: bool
    unavailable: dict[str, str]  # diagnosis id -> why it is not scored

    @property
    def diag_ids(self) -> list[str]:
        return [ps.diagnosis for ps in self.sets]


def _roles(dataset, cfg: ZeroShotConfig) -> tuple[dict[str, Any], Any]:
    """The cases' records (metadata only) and the protocol's roles (test, threshold tuning, probe train)."""
    all_ids = list(dataset.case_ids())
    if not all_ids:
        raise FvlmError("the dataset has no cases")
    meta = _meta_records(dataset, all_ids)
    infos = [CaseInfo(c, str(meta[c].patient_id or c), str(meta[c].split or "")) for c in all_ids]
    th = cfg.thresholds
    proto = resolve(infos, cfg.splits.test, cfg.splits.threshold, cfg.splits.train, th.source,
                    th.train_fraction, th.seed)
    if cfg.max_cases:
        proto.test, proto.tune, proto.train = (proto.test[:cfg.max_cases], proto.tune[:cfg.max_cases],
                                               proto.train[:cfg.max_cases])
        proto.notes.append(f"max_cases={cfg.max_cases}: each role truncated (smoke test, not a benchmark)")
    if not cfg.probe.enabled:
        proto.train = []
    return meta, proto


def _prompts(model, taxonomy: Taxonomy, cfg: ZeroShotConfig, emb: CaseEmbeddings, proto) -> _Prompts:
    """Every diagnosis's prompts, encoded once."""
    clip_baseline = cfg.scoring.clip_baseline
    if not clip_baseline and set(emb.arrays) == {GLOBAL}:
        clip_baseline = True
        proto.notes.append("the model has only a global embedding (CLIP-style): every diagnosis is scored "
                           "on it")
    sets = build_prompt_sets(taxonomy, cfg.scoring.prompts, clip_baseline)
    unavailable = {ps.diagnosis: f"the model produces no '{ps.embedding}' embedding"
                   for ps in sets if ps.embedding not in emb.arrays}
    usable = [ps for ps in sets if ps.diagnosis not in unavailable]
    scale = cfg.scoring.logit_scale if cfg.scoring.logit_scale is not None else model_logit_scale(model)
    return _Prompts(sets, usable, encode_prompt_sets(model, usable), scale, clip_baseline, unavailable)


def _scores(emb: CaseEmbeddings, pr: _Prompts, rule: str, ids: list[str]) -> np.ndarray:
    """``(len(ids), D)`` zero-shot scores; 0.5 for a diagnosis that cannot be scored."""
    out = np.full((len(ids), len(pr.sets)), 0.5)
    if not ids:
        return out
    by_diag = score_prompt_sets(emb.arrays, pr.usable, pr.encoded, rule, pr.scale, rows=emb.rows(ids))
    for j, ps in enumerate(pr.sets):
        if ps.diagnosis in by_diag:
            out[:, j] = by_diag[ps.diagnosis]
    return out


def _labels(meta: dict, ids: list[str], diag_ids: list[str], label_table: LabelTable | None,
            silver_outside: bool) -> tuple[np.ndarray, dict]:
    """``(len(ids), D)`` labels (1/0/-1) from the label file(s), else the shards' silver labels;
    ``silver_outside``: cases missing from the files fall back to silver labels."""
    recs = [meta[c] for c in ids]
    if label_table is None:
        return silver_matrix(recs, diag_ids), {"silver": len(ids)}
    lab, found = label_table.matrix(ids, diag_ids)
    src = {"file": int(found.sum()), "missing": int((~found).sum())}
    if silver_outside and (~found).any():
        lab[~found] = silver_matrix([recs[i] for i in np.flatnonzero(~found)], diag_ids)
        src = {"file": int(found.sum()), "silver": int((~found).sum())}
    return lab, src


def _ground_truth(label_table: LabelTable | None, cfg: ZeroShotConfig, per_role: dict) -> dict:
    if label_table is None:
        gt = {"source": "silver", "description": "silver labels stored in the shards (report labeler); "
              "-1 (uncertain / not mentioned) counts as unlabeled"}
    else:
        gt = {"source": "labels_file", "files": label_table.files, "columns": label_table.columns,
              "ignored_columns": label_table.ignored_columns,
              "description": "ground truth from the label file(s) on the test split"
              + ("; cases of other splits missing from the files use silver labels"
                 if cfg.silver_outside_test else "")}
    gt["per_role"] = per_role
    return gt


def _protocol_doc(cfg: ZeroShotConfig, proto, patients: list[str]) -> dict:
    th = cfg.thresholds
    return {"name": cfg.protocol, **proto.to_json(), "test_split": cfg.splits.test,
            "threshold_method": th.method,
            "target_sensitivity": th.target_sensitivity if th.method == "sensitivity" else None,
            "bootstrap": {"unit": "patient", "n": cfg.bootstrap.n, "seed": cfg.bootstrap.seed,
                          "level": cfg.bootstrap.level, "n_test_patients": len(set(patients))},
            "min_positives": cfg.min_positives, "min_negatives": cfg.min_negatives,
            "absent_anatomy": cfg.absent_anatomy}


def _prompt_note(cfg: ZeroShotConfig, taxonomy: Taxonomy, sets) -> str | None:
    if cfg.scoring.prompts != "ctclip":
        return None
    no_ct = [ps.diagnosis for ps in sets if not taxonomy.diagnosis(ps.diagnosis).ctrate]
    return f"{len(no_ct)} diagnoses have no CT-RATE name and keep the taxonomy's prompts" if no_ct else None


def run_suite(model, dataset, taxonomy, cfg: ZeroShotConfig, make_batch: Callable,
              label_table: LabelTable | None = None, cache: EmbeddingCache | None = None,
              provenance: dict | None = None) -> SuiteOutput:
    """Run the whole benchmark and return the results document (see module docstring)."""
    t0 = time.time()
    taxonomy = Taxonomy.of(taxonomy)
    meta, proto = _roles(dataset, cfg)
    needed = list(dict.fromkeys(proto.test + proto.tune + proto.train))
    log.info("encoding %d cases (%d test, %d tuning, %d probe-train)", len(needed), len(proto.test),
             len(proto.tune), len(proto.train))
    emb = encode_cases(model, dataset, needed, make_batch, cfg.batch_size, cache,
                       get_kwargs=getattr(make_batch, "get_kwargs", None))
    pr = _prompts(model, taxonomy, cfg, emb, proto)
    sets, diag_ids, unavailable = pr.sets, pr.diag_ids, pr.unavailable
    infos_d = [DiagnosisInfo(ps.diagnosis, ps.name, ps.anatomy, ps.embedding) for ps in sets]

    y_test, src_test = _labels(meta, proto.test, diag_ids, label_table, False)
    y_tune, src_tune = _labels(meta, proto.tune, diag_ids, label_table, cfg.silver_outside_test)
    y_train, src_train = _labels(meta, proto.train, diag_ids, label_table, cfg.silver_outside_test)
    if label_table is not None:
        for d in diag_ids:
            if d not in label_table.columns and d not in unavailable:
                unavailable[d] = "no column for this diagnosis in the label file(s)"
    s_test, s_tune = _scores(emb, pr, cfg.scoring.rule, proto.test), _scores(emb, pr, cfg.scoring.rule, proto.tune)
    inc_test = _include_matrix(sets, emb, emb.rows(proto.test), cfg.absent_anatomy)
    inc_tune = _include_matrix(sets, emb, emb.rows(proto.tune), cfg.absent_anatomy)
    patients = [str(meta[c].patient_id or c) for c in proto.test]
    has_tune = bool(proto.tune)
    th = cfg.thresholds
    common = dict(min_positives=cfg.min_positives, min_negatives=cfg.min_negatives,
                  threshold_method=th.method, target_sensitivity=th.target_sensitivity,
                  n_boot=cfg.bootstrap.n, seed=cfg.bootstrap.seed, level=cfg.bootstrap.level)
    zs = evaluate(infos_d, s_test, y_test, inc_test, patients, s_tune if has_tune else None,
                  y_tune if has_tune else None, inc_tune if has_tune else None,
                  unavailable=unavailable, **common)
    roc = roc_points(infos_d, s_test, y_test, inc_test, list(zs["diagnoses"]))
    probe_res = None
    if cfg.probe.enabled:
        probe_res = _linear_probe(cfg, sets, emb, proto, y_train, y_test, y_tune, inc_test, inc_tune,
                                  patients, infos_d, unavailable, common)
    retrieval, text_calls = None, 0
    if cfg.retrieval.enabled:
        sub = emb.subset(proto.test)
        retrieval, text_calls = run_retrieval(model, [meta[c] for c in proto.test], sub.arrays, sub.present,
                                              cfg.retrieval.ks, cfg.retrieval.report_fields)
    results = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(provenance or {}),
        "taxonomy": {"name": taxonomy.name, "n_diagnoses": len(sets),
                     "anatomies": sorted({ps.anatomy for ps in sets})},
        "ground_truth": _ground_truth(label_table, cfg, {"test": src_test, "threshold_tuning": src_tune,
                                                         "probe_train": src_train}),
        "protocol": _protocol_doc(cfg, proto, patients),
        "scoring": {"rule": cfg.scoring.rule, "logit_scale": pr.scale, "prompts": cfg.scoring.prompts,
                    "prompt_note": _prompt_note(cfg, taxonomy, sets),
                    "embedding": "global" if pr.clip_baseline else "anatomy (global for whole-scan)"},
        "zeroshot": zs,
        "linear_probe": probe_res,
        "retrieval": retrieval,
        "compute": {"cases_encoded": len(needed), "image_forwards": emb.n_forwards,
                    "rows_from_cache": emb.n_cached, "cache": str(cache.path) if cache else None,
                    "prompt_texts": pr.encoded.n_texts, "prompt_text_calls": pr.encoded.n_calls,
                    "retrieval_text_calls": text_calls, "seconds": round(time.time() - t0, 3)},
        "config": to_dict(cfg),
    }
    return SuiteOutput(results, roc, emb)


def _linear_probe(cfg, sets, emb, proto, y_train, y_test, y_tune, inc_test, inc_tune, patients, infos_d,
                  unavailable, common) -> dict:
    if not proto.train:
        return {"status": "not run: no probe-train cases (split "
                          f"'{cfg.splits.train}' is empty or used up by threshold tuning)"}
    r_train, r_test, r_tune = emb.rows(proto.train), emb.rows(proto.test), emb.rows(proto.tune)
    inc_train = _include_matrix(sets, emb, r_train, cfg.absent_anatomy)
    s_test = np.full((len(proto.test), len(sets)), 0.5)
    s_tune = np.full((len(proto.tune), len(sets)), 0.5)
    unav = dict(unavailable)
    for j, ps in enumerate(sets):
        if ps.diagnosis in unav:
            continue
        ok = inc_train[:, j] & (y_train[:, j] >= 0)
        x = emb.arrays[ps.embedding]
        preds, why = probe_mod.fit_predict(x[r_train][ok], y_train[ok, j], [x[r_test], x[r_tune]],
                                           cfg.probe.C, cfg.probe.max_iter, cfg.probe.class_weight)
        if preds is None:
            unav[ps.diagnosis] = f"linear probe not trained: {why}"
            continue
        s_test[:, j], s_tune[:, j] = preds
    has_tune = bool(proto.tune)
    res = evaluate(infos_d, s_test, y_test, inc_test, patients, s_tune if has_tune else None,
                   y_tune if has_tune else None, inc_tune if has_tune else None, unavailable=unav, **common)
    res["status"] = "ok"
    res["model"] = {"kind": "sklearn LogisticRegression", "C": cfg.probe.C, "max_iter": cfg.probe.max_iter,
                    "class_weight": cfg.probe.class_weight, "n_train_cases": len(proto.train)}
    return res
