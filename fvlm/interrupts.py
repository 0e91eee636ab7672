"""Ctrl-C and SIGTERM that always land.

Inside :func:`interrupts`, SIGINT and SIGTERM raise ``KeyboardInterrupt`` (exit 130) *and* are
recorded. Python discards an exception raised while a ``__del__`` or a weakref callback runs (it
only prints "Exception ignored"), so a signal landing there used to be lost and the run went on
to the end; :func:`check_interrupted`, called at each step of a long loop, raises it again.

Inside :func:`deferred` (a training step and its checkpoint save) the first signal is only
recorded: the trainer finishes the step, saves a checkpoint and then raises ``KeyboardInterrupt``
itself, so a scheduler's cancel costs no finished step. A second signal raises at once; what it
cuts short is never half-written (checkpoints are staged and renamed into place).

:func:`interrupts` is re-entrant: an inner use (a command inside ``fvlm``'s own) shares the
outer one's handlers and record.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys

__all__ = ["interrupts", "check_interrupted", "deferred", "pending"]

log = logging.getLogger(__name__)

_pending: int | None = None
_depth = 0        # nesting of interrupts() with our handlers installed
_defer = 0        # nesting of deferred()


def _on_signal(signum, frame) -> None:
    global _pending
    first = _pending is None
    _pending = signum
    if _defer and first:
        log.warning("%s: finishing this step and saving a checkpoint, then stopping (send it again to stop "
                    "at once)", signal.Signals(signum).name)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts():
    """SIGINT and SIGTERM stop the run (``KeyboardInterrupt``, exit 130) wherever they land."""
    global _pending, _depth
    if _depth:
        yield
        return
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
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        for s, h in old.items():
            signal.signal(s, h)
        sys.unraisablehook = hook
        _pending = None


@contextlib.contextmanager
def deferred():
    """Inside, the first SIGINT/SIGTERM is recorded (see :func:`pending`) instead of raised; a
    second one raises. Outside :func:`interrupts` it changes nothing."""
    global _defer
    _defer += 1
    try:
        yield
    finally:
        _defer -= 1


def pending() -> bool:
    """Whether a signal arrived since :func:`interrupts` began."""
    return _pending is not None


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a signal arrived since :func:`interrupts` began (even if the
    exception it raised was swallowed)."""
    if _pending is not None:
        raise KeyboardInterrupt
