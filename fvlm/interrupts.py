"""Ctrl-C and SIGTERM that always land.

Inside :func:`interrupts`, SIGINT and SIGTERM raise ``KeyboardInterrupt`` (exit 130) *and* are
recorded. Python discards an exception raised while a ``__del__`` or a weakref callback runs (it
only prints "Exception ignored"), so a signal landing there used to be lost and the run went on
to the end; :func:`check_interrupted`, called at each step of a long loop, raises it again.
"""
from __future__ import annotations

import contextlib
import signal
import sys

__all__ = ["interrupts", "check_interrupted"]

_pending: int | None = None


def _on_signal(signum, frame) -> None:
    global _pending
    _pending = signum
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts():
    """SIGINT and SIGTERM stop the run (``KeyboardInterrupt``, exit 130) wherever they land."""
    global _pending
    _pending = None
    try:
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        yield
        return
    hook = sys.unraisablehook

    def quiet(u):  # a swallowed interrupt is raised again by check_interrupted: no "Exception ignored" trace
        if u.exc_type is not KeyboardInterrupt:
            hook(u)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sys.unraisablehook = hook
        _pending = None


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a signal arrived since :func:`interrupts` began (even if the
    exception it raised was swallowed)."""
    if _pending is not None:
        raise KeyboardInterrupt
