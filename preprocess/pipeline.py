"""The preprocessing job: plan, process (parallel, restartable), assemble shards, index, summary.

Restart model. Every case result is first written atomically by its worker as a
compressed one-case shard (``.state/cases/<id>.h5``; failures to
``.state/errors/<id>.json``). A shard is assembled from the staged cases of its slot
once all of them are resolved, by copying their compressed chunks (no recompression,
so the serial step is cheap) into ``<shard>.tmp`` and renaming; then its staging files go. Which
case goes into which shard is planned by case id before any work and saved
(``.state/plan.json``, preprocess/resume.py): a re-run reuses the finished cases it still
finds in the manifest with unchanged inputs, wherever their rows moved, re-processes
changed ones, reports stale ones, skips staged cases, and re-assembles any shard left
half-written. Shard contents depend only on the plan, never on worker timing, so an
interrupted + resumed run produces the same bytes as an uninterrupted one. Workers are
watched (preprocess/runner.py): a killed worker fails its case, Ctrl-C stops them all.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path


from fvlm.anatomy import AnatomySet, load_anatomy_set
from fvlm.data.shards import (DATASET_INFO_NAME, INDEX_NAME, ShardLayout, concat_shards, open_h5, read_index,
                              write_dataset_info, write_index, write_shard)
from fvlm.errors import FvlmError
from fvlm.progress import progress
from fvlm.taxonomy import load_taxonomy

from . import resume, runner, writer
from .case import HU_HIST_EDGES
from .config import PreprocessConfig
from .errors import CaseError
from .inputs import CaseSpec
from .qc import montage, qc_sample, write_summary

__all__ = ["run_preprocess", "check_output", "merge_parts", "build_layout", "plan_shards", "make_labeler",
           "is_disk_full"]

log = logging.getLogger("fvlm.preprocess")


def build_layout(cfg: PreprocessConfig, aset: AnatomySet) -> ShardLayout:
    return writer.build_layout(cfg, aset)


def part_tag(i: int, n: int) -> str:
    return f"{i:03d}-of-{n:03d}"


def plan_shards(specs: list[CaseSpec], shard_index: int, num_shards: int, per_shard: int):
    """This job's cases (every ``num_shards``-th, starting at ``shard_index``) in shard slots."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise FvlmError(f"--shard-index must be in 0..{num_shards - 1} (got {shard_index}, --num-shards {num_shards})")
    mine = specs[shard_index::num_shards]
    return [(f"shards/{shard_index:03d}-{k:05d}.h5", mine[s:s + per_shard])
            for k, s in enumerate(range(0, len(mine), per_shard))]


def make_labeler(cfg: PreprocessConfig):
    """The report labeler when enabled and importable, else None (logged once)."""
    if not cfg.reports.labeler:
        return None
    try:
        from preprocess.reports import ReportLabeler
    except ImportError as e:
        log.info("report labeler not available (%s); shards get report text without silver labels", e)
        return None
    return ReportLabeler(cfg.reports.taxonomy)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, also in the shape h5py reports it (``RuntimeError: ... errno = 28``)."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("errno = 28" in str(e) or "No space left" in str(e))


_FREE_MARGIN = 1 << 20  # bytes kept free beyond an estimate


def _no_room(path: Path, need: int) -> bool:
    """True when ``path``'s file system has less than ``need`` bytes (+ a margin) free.

    Checked before HDF5 writes: libhdf5 reports ENOSPC while closing a file and the
    process then segfaults (exit 139), so a full disk must be seen before writing.
    """
    import shutil

    try:
        return shutil.disk_usage(path).free < need + _FREE_MARGIN
    except OSError:
        return False


def _record_nbytes(rec) -> int:
    """Uncompressed bytes of a record's arrays: an upper bound of its staged file's size."""
    import numpy as np

    n = 0
    for v in vars(rec).values():
        for a in (v.values() if isinstance(v, dict) else (v,)):
            if isinstance(a, np.ndarray):
                n += a.nbytes
    return n


def _disk_full_error(where) -> FvlmError:
    return FvlmError(f"no space left on device writing {where}; free space and run the same command again "
                     "(finished cases are kept)")


# --------------------------------------------------------------------------- staging


def _stage_paths(out: Path, case_id: str) -> tuple[Path, Path]:
    return out / ".state" / "cases" / f"{case_id}.h5", out / ".state" / "errors" / f"{case_id}.json"


def _write_error(path: Path, case_id: str, stage: str, reason: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"case_id": case_id, "stage": stage, "reason": reason}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- workers

_CTX: dict = {}


def _init_worker(cfg: PreprocessConfig, out: str, qc_ids: set, labeler=None) -> None:
    aset = load_anatomy_set(cfg.anatomy_set)
    # the in-process path hands over the labeler the job already built (it was built twice)
    _CTX.update(cfg=cfg, out=Path(out), aset=aset, layout=build_layout(cfg, aset), qc=qc_ids, labeler=labeler,
                labeler_ready=labeler is not None)


def _work(spec: CaseSpec) -> tuple[str, str, str, float]:
    cfg, out, aset, layout = _CTX["cfg"], _CTX["out"], _CTX["aset"], _CTX["layout"]
    if not _CTX["labeler_ready"]:
        _CTX["labeler"] = make_labeler(cfg)
        _CTX["labeler_ready"] = True
    staged, errp = _stage_paths(out, spec.case_id)
    t0 = time.perf_counter()
    try:
        rec = writer.case_record(spec, cfg, aset, layout, _CTX["labeler"])
    except CaseError as e:
        _write_error(errp, spec.case_id, e.stage, e.reason)
        return spec.case_id, "error", f"[{e.stage}] {e.reason}", time.perf_counter() - t0
    except MemoryError:
        _write_error(errp, spec.case_id, "load", "out of memory")
        return spec.case_id, "error", "[load] out of memory", time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - one unexpected failure must not stop a corpus-wide job
        log.exception("%s: unexpected error", spec.case_id)
        _write_error(errp, spec.case_id, "internal", f"unexpected {type(e).__name__}: {e} (see the log)")
        return spec.case_id, "error", f"unexpected {type(e).__name__}: {e}", time.perf_counter() - t0
    staged.parent.mkdir(parents=True, exist_ok=True)
    if _no_room(staged.parent, _record_nbytes(rec)):
        return spec.case_id, "disk_full", str(staged), time.perf_counter() - t0
    try:  # a one-case shard, compressed here in the worker; assembly only copies its chunks
        write_shard(staged, layout, [rec], n=1)
    except (OSError, RuntimeError) as e:  # h5py reports a full disk as RuntimeError (errno = 28)
        if is_disk_full(e):  # every later case would fail the same way: the job stops
            return spec.case_id, "disk_full", str(staged), time.perf_counter() - t0
        _write_error(errp, spec.case_id, "write", f"cannot write staging file: {e}")
        return spec.case_id, "error", f"[write] {e}", time.perf_counter() - t0
    if errp.exists():
        errp.unlink()
    if spec.case_id in _CTX["qc"]:
        try:
            montage(rec, aset.ids, out / "qc" / f"{spec.case_id}.png", window=tuple(cfg.window), dpi=cfg.qc.dpi)
        except Exception as e:  # noqa: BLE001 - QC is best effort; the case itself is fine
            log.warning("%s: QC montage failed: %s", spec.case_id, e)
    return spec.case_id, "ok", "", time.perf_counter() - t0


# --------------------------------------------------------------------------- job


@dataclass
class _Slot:
    rel: str
    specs: list


def _slot_resolved(out: Path, slot: _Slot) -> bool:
    return all(any(p.exists() for p in _stage_paths(out, s.case_id)) for s in slot.specs)


def _assemble(out: Path, slot: _Slot, layout: ShardLayout, attrs: dict) -> None:
    ok = [s for s in slot.specs if _stage_paths(out, s.case_id)[0].exists()]
    concat_shards(out / slot.rel, layout, [_stage_paths(out, s.case_id)[0] for s in ok], attrs=attrs)
    for s in ok:
        _stage_paths(out, s.case_id)[0].unlink()
    log.info("wrote %s (%d cases)", slot.rel, len(ok))


def _shard_rows(out: Path, rel: str, anatomies: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    rows, metas, present = [], [], []
    with open_h5(out / rel, "r") as f:
        n = int(f.attrs["n_cases"])
        if n == 0:
            return rows, metas, present
        ids = f["case_id"].asstr()[:]
        pids = f["patient_id"].asstr()[:]
        splits = f["split"].asstr()[:]
        pres = f["present"][:]
        mt = f["meta"].asstr()[:]
    for i in range(n):
        p = {a: bool(pres[i, j]) for j, a in enumerate(anatomies)}
        rows.append({"case_id": ids[i], "patient_id": pids[i], "split": splits[i], "shard": rel, "row": i,
                     "anatomies": [a for a in anatomies if p[a]]})
        metas.append(json.loads(mt[i]))
        present.append(p)
    return rows, metas, present


def _check_dataset_info(out: Path, info_extra: dict, layout: ShardLayout) -> None:
    p = out / DATASET_INFO_NAME
    if p.is_file():
        old = json.loads(p.read_text(encoding="utf-8"))
        new = {"layout": layout.to_dict(), **info_extra}
        diff = [k for k in new if json.dumps(old.get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)]
        if diff:
            raise FvlmError(f"{out} holds shards written with different settings ({', '.join(diff)}); "
                            "use a new --out directory or the same config")


def _settings(cfg: PreprocessConfig):
    aset = load_anatomy_set(cfg.anatomy_set)
    layout = build_layout(cfg, aset)
    if cfg.masks.class_map not in aset.class_maps:
        raise FvlmError(f"anatomy set {aset.name!r} has no class names for TotalSegmentator map "
                        f"{cfg.masks.class_map!r} (it has {', '.join(aset.class_maps)})")
    info_extra = {"anatomy_set": aset.name, "anatomy_set_def": aset.to_dict(), "class_map": cfg.masks.class_map,
                  "target_spacing_mm": list(cfg.target_spacing_mm),
                  "whole_spacing_mm": list(cfg.whole.spacing_mm or cfg.target_spacing_mm),
                  "orientation": cfg.orientation.upper(), "window_default": list(cfg.window),
                  "crop_oversize": cfg.crop.oversize}
    return aset, layout, info_extra


def check_output(cfg: PreprocessConfig, out: str | Path) -> None:
    """Refuse ``out`` before anything is written there: not a directory, or shards made with other settings."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FvlmError(f"--out {out} is a file; give a directory")
    _, layout, info_extra = _settings(cfg)
    if out.is_dir():
        _check_dataset_info(out, info_extra, layout)


def _plan_path(out: Path, shard_index: int, num_shards: int) -> Path:
    tag = "" if num_shards == 1 else "-" + part_tag(shard_index, num_shards)
    return out / ".state" / f"plan{tag}.json"


def _shard_case_ids(path: Path) -> list[str]:
    with open_h5(path, "r") as f:
        return list(f["case_id"].asstr()[:]) if int(f.attrs["n_cases"]) else []


def _set_aside_damaged(out: Path, prefix: str) -> None:
    """A finished shard that no longer opens (truncated, overwritten) is renamed ``*.damaged``; its cases
    are then processed again. Renamed, not deleted: nothing written before is lost."""
    for p in sorted(out.glob(prefix + "*.h5")):
        try:
            with open_h5(p, "r") as f:
                int(f.attrs["n_cases"])
                if int(f.attrs["n_cases"]):
                    f["case_id"].shape  # noqa: B018 - touches the dataset index
        except (OSError, KeyError, ValueError) as e:
            bad = p.with_name(p.name + ".damaged")
            os.replace(p, bad)
            log.warning("%s cannot be read (%s); renamed to %s, its cases are processed again",
                        p, str(e).splitlines()[0][:200], bad.name)


def _discard_staged(out: Path, case_id: str) -> None:
    for p in _stage_paths(out, case_id):
        p.unlink(missing_ok=True)


def _plan(out: Path, specs: list[CaseSpec], shard_index: int, num_shards: int, per_shard: int):
    """This part's slots, keyed by case id (preprocess/resume.py); the plan is saved before any work."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise FvlmError(f"--shard-index must be in 0..{num_shards - 1} (got {shard_index}, --num-shards {num_shards})")
    mine = specs[shard_index::num_shards]
    by_id = {s.case_id: s for s in mine}
    plan_path = _plan_path(out, shard_index, num_shards)
    _set_aside_damaged(out, f"shards/{shard_index:03d}-")
    res = resume.plan_part(out, plan_path, mine, f"shards/{shard_index:03d}-", per_shard, _shard_case_ids,
                           lambda c: _discard_staged(out, c))
    resume.write_plan(plan_path, res.slots)
    if res.stale:
        log.warning("%d case(s) in finished shards are no longer in the manifest and are left out of the index: %s",
                    len(res.stale), ", ".join(res.stale[:10]) + (" ..." if len(res.stale) > 10 else ""))
    if res.changed:
        log.info("%d case(s) whose inputs changed are processed again: %s", len(res.changed),
                 ", ".join(res.changed[:10]) + (" ..." if len(res.changed) > 10 else ""))
    return [_Slot(sl.rel, [by_id[c] for c in sl.ids]) for sl in res.slots], res


def _died(out: Path):
    def died(spec: CaseSpec, how: str) -> tuple:
        reason = f"the worker process {how} while processing this case (out of memory?)"
        _write_error(_stage_paths(out, spec.case_id)[1], spec.case_id, "internal", reason)
        return spec.case_id, "error", f"[internal] {reason}", 0.0
    return died


def run_preprocess(cfg: PreprocessConfig, specs: list[CaseSpec], out: str | Path, num_workers: int = 1,
                   shard_index: int = 0, num_shards: int = 1) -> dict:
    """Process this job's part of ``specs`` into ``out``; returns the summary dict.

    Resumes by case id (preprocess/resume.py). Raises :class:`FvlmError` when the disk is full,
    ``KeyboardInterrupt`` on SIGINT or SIGTERM, wherever it lands (``runner.interrupts``).
    """
    with runner.interrupts():
        try:
            summary = _run_preprocess(cfg, specs, out, num_workers, shard_index, num_shards)
            runner.check_interrupted()
        except KeyboardInterrupt:  # the workers are stopped: what they were writing is discarded
            for tmp in (Path(out) / ".state" / "cases").glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            raise
    return summary


def _run_preprocess(cfg: PreprocessConfig, specs: list[CaseSpec], out: str | Path, num_workers: int,
                    shard_index: int, num_shards: int) -> dict:
    out = Path(out)
    check_output(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    aset, layout, info_extra = _settings(cfg)
    workers = max(1, int(num_workers))
    labeler = _parent_labeler(cfg, workers)
    write_dataset_info(out, layout, info_extra)
    attrs = {"anatomy_set": aset.name, "class_map": cfg.masks.class_map,
             "target_spacing_mm": list(cfg.target_spacing_mm)}
    slots, res = _plan(out, specs, shard_index, num_shards, cfg.shards.samples_per_shard)
    done_slots = [sl for sl in slots if (out / sl.rel).exists()]
    todo = _resume_slots(out, slots)
    n_mine = sum(len(sl.specs) for sl in slots)
    qc_ids = qc_sample([s.case_id for sl in slots for s in sl.specs], cfg.qc.num_cases)
    qc_ids = {c for c in qc_ids if not (out / "qc" / f"{c}.png").exists()}
    log.info("%d cases in this part (%d shard slots, %d already final); %d to process with %d worker(s)",
             n_mine, len(slots), len(done_slots), len(todo), num_workers)
    run = {"processed_ok": 0, "failed": 0, "reused": n_mine - len(todo), "stale": res.stale,
           "reprocessed_changed": res.changed}
    pending = [sl for sl in slots if not (out / sl.rel).exists()]

    def flush():
        _assemble_resolved(out, pending, layout, attrs)

    flush()
    t0 = time.perf_counter()
    results = _case_results(cfg, out, todo, workers, qc_ids, labeler)
    try:
        for cid, status, msg, secs in progress(results, desc="preprocess", total=len(todo), unit="case"):
            runner.check_interrupted()
            if status == "disk_full":
                raise _disk_full_error(msg)
            if status == "ok":
                run["processed_ok"] += 1
                log.debug("%s: ok (%.1f s)", cid, secs)  # the progress bar shows progress; the log file keeps failures
            else:
                run["failed"] += 1
                log.warning("%s: failed %s", cid, msg)
            flush()
    finally:
        if hasattr(results, "close"):  # stops and reaps the workers on any exit, Ctrl-C included
            results.close()
    runner.check_interrupted()
    flush()
    run["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        return finish_part(out, slots, aset.ids, shard_index, num_shards, cfg, run)
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise _disk_full_error(out) from None
        raise


def _parent_labeler(cfg: PreprocessConfig, workers: int):
    """The report labeler of an in-process run (None with worker processes, which build their own);
    either way a bad taxonomy name fails here, before any case runs."""
    if workers > 1 and cfg.reports.labeler:
        # building a labeler imports nltk, 1.3 s the first case would wait for
        load_taxonomy(cfg.reports.taxonomy)
        return None
    return make_labeler(cfg)


def _resume_slots(out: Path, slots) -> list:
    """Clean what an earlier run left in unfinished shard slots; return the cases still to process."""
    for sl in slots:  # a crash mid-assembly leaves <shard>.tmp: discard, it is rebuilt from staging
        tmp = out / (sl.rel + ".tmp")
        if tmp.exists():
            tmp.unlink()
    for sl in slots:  # failed cases of unfinished shards are retried
        if not (out / sl.rel).exists():
            for s in sl.specs:
                ep = _stage_paths(out, s.case_id)[1]
                if ep.exists():
                    ep.unlink()
    return [s for sl in slots if not (out / sl.rel).exists() for s in sl.specs
            if not _stage_paths(out, s.case_id)[0].exists()]


def _assemble_resolved(out: Path, pending: list, layout, attrs: dict) -> None:
    """Assemble every pending shard whose cases are all resolved (removed from ``pending``)."""
    for sl in list(pending):
        if _slot_resolved(out, sl):
            staged = [_stage_paths(out, s.case_id)[0] for s in sl.specs]
            if _no_room(out, sum(p.stat().st_size for p in staged if p.exists())):
                raise _disk_full_error(out / sl.rel)
            try:
                _assemble(out, sl, layout, attrs)
            except (OSError, RuntimeError) as e:
                if is_disk_full(e):
                    raise _disk_full_error(out / sl.rel) from None
                raise
            pending.remove(sl)


def _case_results(cfg: PreprocessConfig, out: Path, todo: list, workers: int, qc_ids: set, labeler):
    """``(case id, status, message, seconds)`` of each case of ``todo``, in this process or a pool."""
    if workers == 1 or len(todo) <= 1:
        _init_worker(cfg, str(out), qc_ids, labeler)
        return iter(map(_work, todo))
    import multiprocessing as mp

    # spawn, not fork: the parent may hold HDF5 handles or threads
    return runner.run_pool(todo, workers, _init_worker, (cfg, str(out), qc_ids), _work, out / ".state",
                           _died(out), mp.get_context("spawn"))


def _errors_for(out: Path, specs) -> list[dict]:
    errs = []
    for s in specs:
        p = _stage_paths(out, s.case_id)[1]
        if p.exists():
            errs.append(json.loads(p.read_text(encoding="utf-8")))
    return errs


def finish_part(out: Path, slots, anatomies, shard_index, num_shards, cfg, run) -> dict:
    rows, metas, present = [], [], []
    for sl in slots:
        if (out / sl.rel).exists():
            live = {s.case_id for s in sl.specs}  # rows of stale or superseded cases stay unindexed
            for r, m, p in zip(*_shard_rows(out, sl.rel, anatomies)):
                if r["case_id"] in live:
                    rows.append(r)
                    metas.append(m)
                    present.append(p)
    errors = _errors_for(out, [s for sl in slots for s in sl.specs])
    # an error file of a case that finally made it into a shard is stale
    ok_ids = {r["case_id"] for r in rows}
    errors = [e for e in errors if e["case_id"] not in ok_ids]
    single = num_shards == 1
    tag = "" if single else "-" + part_tag(shard_index, num_shards)
    write_index(out / (INDEX_NAME if single else f"index{tag}.jsonl"), rows)
    write_index(out / f"errors{tag}.jsonl", errors)
    summary = write_summary(out, metas, present, errors, run, anatomies, HU_HIST_EDGES, suffix=tag)
    return summary


def merge_parts(out: str | Path, expect: int | None = None) -> dict:
    """Merge ``index-III-of-NNN.jsonl`` / ``errors-...`` / summaries of all parts into the final files."""
    out = Path(out)
    parts = sorted(out.glob("index-*-of-*.jsonl"))
    if not parts:
        raise FvlmError(f"{out}: no index-III-of-NNN.jsonl part files to merge")
    totals = {int(p.stem.split("-of-")[1]) for p in parts}
    if len(totals) != 1:
        raise FvlmError(f"{out}: part files from different --num-shards values: {sorted(totals)}")
    n = totals.pop()
    if expect is not None and expect != n:
        raise FvlmError(f"{out}: parts say --num-shards {n}, expected {expect}")
    have = {int(p.stem.split("-")[1]) for p in parts}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise FvlmError(f"{out}: parts {missing} of {n} have not finished (no index-{missing[0]:03d}-of-{n:03d}.jsonl)")
    rows, errors, seen = [], [], set()
    for i in range(n):
        for r in read_index(out / f"index-{part_tag(i, n)}.jsonl"):
            if r["case_id"] in seen:
                raise FvlmError(f"{out}: case {r['case_id']!r} appears in two parts")
            seen.add(r["case_id"])
            rows.append(r)
        ep = out / f"errors-{part_tag(i, n)}.jsonl"
        if ep.exists():
            errors += read_index(ep)
    write_index(out / INDEX_NAME, rows)
    write_index(out / "errors.jsonl", errors)
    info = json.loads((out / DATASET_INFO_NAME).read_text(encoding="utf-8"))
    anatomies = info["layout"]["anatomies"]
    metas, present = [], []
    for rel in sorted({r["shard"] for r in rows}):
        _, m, p = _shard_rows(out, rel, anatomies)
        metas += m
        present += p
    run = {"parts": n}
    return write_summary(out, metas, present, errors, run, anatomies, HU_HIST_EDGES)
