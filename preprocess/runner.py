"""Worker processes whose death is noticed.

``multiprocessing.Pool`` waits forever for a result a SIGKILLed worker (the
out-of-memory killer) will never send. :func:`run_pool` uses
:class:`concurrent.futures.ProcessPoolExecutor`, which marks the pool broken when a
worker dies; the cases that worker was processing (known from a marker file each case
writes while it runs, ``.state/running/<id>``) fail with a clear reason, and the rest
are handed to a fresh pool. Workers ignore SIGINT: Ctrl-C reaches the parent, which
kills every worker and re-raises ``KeyboardInterrupt`` (exit 130); the next run resumes.

The run loop calls :func:`fvlm.interrupts.check_interrupted` at every step: a Ctrl-C whose
``KeyboardInterrupt`` Python swallowed (raised inside a ``__del__``) still stops the run.
"""
from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator

from fvlm.interrupts import check_interrupted, interrupts

__all__ = ["run_pool", "clear_running", "interrupts", "check_interrupted"]

log = logging.getLogger("fvlm.preprocess")
_MAX_UNEXPLAINED = 2  # a case in flight during this many unexplained pool deaths is failed


def _init(initializer, initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    initializer(*initargs)


def _guarded(work: Callable, spec, running: str):
    marker = Path(running) / spec.case_id
    marker.write_text(str(os.getpid()), encoding="utf-8")
    try:
        return work(spec)
    finally:
        marker.unlink(missing_ok=True)


def clear_running(running: Path) -> None:
    """Markers left by an earlier run's workers (killed with it) mean nothing now."""
    running.mkdir(parents=True, exist_ok=True)
    for p in running.iterdir():
        p.unlink(missing_ok=True)


def _kill(ex: ProcessPoolExecutor, procs: dict) -> None:
    procs.update(getattr(ex, "_processes", None) or {})
    for p in procs.values():
        if p.exitcode is None:
            p.kill()
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs.values():
        p.join(timeout=10)


def _culprits(running: Path, procs: dict, inflight: set) -> tuple[dict, set]:
    """``({case_id: signal/exit description}, unexplained ids)`` of the cases in flight when the pool broke."""
    blamed, unexplained = {}, set()
    for m in list(running.iterdir()):
        cid = m.name
        try:
            pid = int(m.read_text(encoding="utf-8") or -1)
        except (OSError, ValueError):
            pid = -1
        m.unlink(missing_ok=True)
        if cid not in inflight:
            continue
        p = procs.get(pid)
        code = p.exitcode if p is not None else None
        # the executor SIGTERMs the surviving workers once one has died: those are innocent
        if code is not None and code != -signal.SIGTERM:
            blamed[cid] = (f"killed by signal {-code} ({signal.Signals(-code).name})" if code < 0
                           else f"exited with code {code}")
        else:
            unexplained.add(cid)
    return blamed, unexplained


def run_pool(todo: list, workers: int, initializer: Callable, initargs: tuple, work: Callable,
             state: Path, died: Callable[[object, str], tuple], ctx) -> Iterator[tuple]:
    """Yield ``work(spec)`` for every spec in ``todo`` from ``workers`` processes (any order).

    A case whose worker process died yields ``died(spec, how)`` instead (the caller records
    the failure). ``ctx`` is the multiprocessing context (spawn).
    """
    running = state / "running"
    clear_running(running)
    left = {s.case_id: s for s in todo}
    strikes: dict[str, int] = {}
    while left:
        ex = ProcessPoolExecutor(max_workers=min(workers, len(left)), mp_context=ctx, initializer=_init,
                                 initargs=(initializer, initargs), max_tasks_per_child=50)
        procs: dict = {}
        broken = False
        try:
            # submitted inside the try: an interrupt while the workers start still stops them (else the
            # executor's exit handler would wait for every submitted case)
            futs = {ex.submit(_guarded, work, s, str(running)): cid for cid, s in left.items()}
            procs.update(getattr(ex, "_processes", None) or {})
            pending = set(futs)
            while pending and not broken:
                check_interrupted()
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                procs.update(getattr(ex, "_processes", None) or {})
                check_interrupted()
                for f in done:
                    try:
                        res = f.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    left.pop(futs[f], None)
                    yield res
        except BaseException:
            _kill(ex, procs)
            raise
        if not broken:
            ex.shutdown(wait=True)
            continue
        _kill(ex, procs)
        blamed, unexplained = _culprits(running, procs, set(left))
        for cid in unexplained:
            strikes[cid] = strikes.get(cid, 0) + 1
            if strikes[cid] >= _MAX_UNEXPLAINED:
                blamed[cid] = "died (cause unknown)"
        log.warning("a worker process died (%s); %d case(s) left, restarting the pool",
                    ", ".join(f"{c}: {h}" for c, h in blamed.items()) or "cause unknown", len(left) - len(blamed))
        for cid, how in blamed.items():
            yield died(left.pop(cid), how)
