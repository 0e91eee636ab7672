"""DeepSpeed ZeRO-3 helpers the engine owns, for code that reads parameters outside a training step.

Under ZeRO-3 each rank holds a 0-element slice of every parameter; reading one needs a gather,
a collective that every rank must enter. DeepSpeed is imported only when a partitioned
parameter is actually there, so evaluation code can use this without DeepSpeed installed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


def is_partitioned(p) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 has partitioned (it carries a ``ds_id``)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence) -> Iterator[None]:
    """Inside the block the ZeRO-3-partitioned ones of ``params`` are whole on every rank
    (``deepspeed.zero.GatheredParameters``); without any, a no-op. Collective: every rank
    must enter it with the same parameters."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts):
        yield
