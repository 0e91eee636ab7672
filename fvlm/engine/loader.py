"""DataLoaders that keep a GPU fed: worker processes only read and decompress.

``make_loader(stream, ...)`` wraps a training :class:`~fvlm.data.ct.CTStream` (an endless
iterable whose batch ``b`` is a pure function of ``b``); ``case_batches(dataset, ids, ...)``
does the same for evaluation (a fixed list of cases in batches, in order). Workers read the
stored int16/uint8 boxes a batch needs into shared memory (:mod:`fvlm.data.inputs`, host
stage); resampling, windowing and augmentation run batched on the model's device.

HDF5 handles are per process: ``ShardDataset`` opens its files lazily and re-opens them when
it finds itself in a new process id, so each worker opens its own handles after the fork
(never a handle inherited from the parent). ``pin_memory`` is on when the target device is
CUDA (page-locked batches copy asynchronously); ``persistent_workers`` keeps workers (and
their open files) across re-iterations of an evaluation loader. Workers ignore SIGINT and
SIGTERM: the main process owns them (:mod:`fvlm.interrupts`).
"""
from __future__ import annotations

import multiprocessing.queues
import signal
import traceback
from typing import Callable, Sequence

import torch

__all__ = ["make_loader", "case_batches", "CaseBatches"]


def _kwargs(num_workers: int, prefetch_factor: int, device, persistent: bool) -> dict:
    nw = max(0, int(num_workers))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kw = {"num_workers": nw, "pin_memory": dev.type == "cuda"}
    if nw:
        kw.update(prefetch_factor=max(1, int(prefetch_factor)), persistent_workers=persistent,
                  worker_init_fn=_ignore_signals)
    return kw


def _ignore_signals(worker_id: int) -> None:  # noqa: ARG001
    """Ctrl-C in a terminal and torchrun's SIGTERM reach the whole process group; the main process
    decides (it finishes the step, saves a checkpoint and shuts its workers down), so a worker must
    not die of them first (torch would raise "DataLoader worker killed" in the middle of the step).
    A worker whose main process is gone still exits: torch's worker loop watches its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # set in this worker only (after the fork), before its first batch starts the queue's feeder thread
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_feeder_error)


def _feeder_error(e: BaseException, obj) -> None:  # noqa: ARG001
    """A worker's queue thread finding its main process gone (a second Ctrl-C stops the main process
    at once) has nowhere to send the batch: exit quietly instead of printing a traceback into the
    user's terminal. Any other error is printed as Python does."""
    if isinstance(e, (BrokenPipeError, ConnectionResetError)):
        return
    traceback.print_exception(e)


def make_loader(stream, num_workers: int = 2, prefetch_factor: int = 2, device=None,
                persistent_workers: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over a batch stream (``batch_size=None``: the stream yields whole batches).

    With ``W`` workers, worker ``w`` builds stream batches ``start + w, start + w + W, ...`` and
    the loader returns them in stream order, so batches are identical for any ``W``.
    """
    return torch.utils.data.DataLoader(stream, batch_size=None,
                                       **_kwargs(num_workers, prefetch_factor, device, persistent_workers))


class CaseBatches(torch.utils.data.Dataset):
    """Map-style: item ``k`` = ``(case_ids, present, batch)`` for the ``k``-th group of
    ``batch_size`` cases; ``present`` is a list of ``{anatomy: bool}`` (the records' arrays stay
    in the worker; only the model batch crosses the process boundary)."""

    def __init__(self, dataset, case_ids: Sequence[str], batch_size: int, make_batch: Callable,
                 get_kwargs: dict | None = None):
        self.dataset, self.ids, self.bs = dataset, list(case_ids), max(1, int(batch_size))
        self.make_batch, self.get_kwargs = make_batch, dict(get_kwargs or {})

    def __len__(self) -> int:
        return (len(self.ids) + self.bs - 1) // self.bs

    def __getitem__(self, k: int):
        ids = self.ids[k * self.bs:(k + 1) * self.bs]
        records = [self.dataset.get(c, **self.get_kwargs) for c in ids]
        present = [dict(getattr(r, "present", None) or {}) for r in records]
        return ids, present, self.make_batch(records)


def case_batches(dataset, case_ids: Sequence[str], batch_size: int, make_batch: Callable,
                 get_kwargs: dict | None = None, num_workers: int = 0, prefetch_factor: int = 2,
                 device=None) -> torch.utils.data.DataLoader:
    """Evaluation batches of ``case_ids`` in order: yields ``(case_ids, present, batch)``."""
    ds = CaseBatches(dataset, case_ids, batch_size, make_batch, get_kwargs)
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False,
                                       **_kwargs(num_workers, prefetch_factor, device, False))
