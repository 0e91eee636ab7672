"""Progress bars: tqdm on a terminal, silent otherwise or with ``--quiet``."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def enabled() -> bool:
    return not _QUIET and sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             unit: str = "it", **kw) -> "tqdm[T]":
    """A tqdm bar that is disabled when stderr is not a TTY or output is quiet."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled(),
                dynamic_ncols=True, leave=False, **kw)
