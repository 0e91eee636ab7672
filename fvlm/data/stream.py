"""Endless, resumable batch streams: batch ``b`` is a pure function of ``b``.

A stream subclass implements ``make(b)``; iteration starts at ``start`` and DataLoader
workers take every ``num_workers``-th batch, so the order of batches is the same for any
number of workers and a resumed run continues at exactly the next batch.
"""
from __future__ import annotations

import torch


class BatchStream(torch.utils.data.IterableDataset):
    """Base class: subclasses set ``self.start`` and implement ``make(b) -> batch``."""

    start: int = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + w
        while True:
            yield self.make(b)
            b += nw
