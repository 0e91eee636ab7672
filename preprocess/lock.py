"""One run per output directory (and part): a lock file naming the run that holds it.

The lock is created with ``O_EXCL`` (atomic on local file systems and NFSv3+), holds
``{"pid", "host", "started", "command"}``, and is removed when the run ends, however it
ends short of SIGKILL. A lock left by a killed run is taken over when its pid is no
longer running on this host; a lock from another host is never guessed about.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from fvlm.errors import FvlmError

__all__ = ["RunLock"]

log = logging.getLogger("fvlm.preprocess")
_UNREADABLE_GRACE_S = 30  # a lock file still being written by its owner may be empty for a moment


def _block_signals():
    """Block SIGINT and SIGTERM in this thread -> the previous mask (None where that is not possible)."""
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError, ValueError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """``with RunLock(path): ...``; raises :class:`FvlmError` (exit 2) when another run holds ``path``."""

    def __init__(self, path: str | os.PathLike, what: str = "fvlm preprocess"):
        self.path = Path(path)
        self.what = what
        self.held = False

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": " ".join(sys.argv)[:500]}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _stale(self, other: dict | None) -> bool:
        if other is None or not isinstance(other.get("pid"), int):  # empty or garbled
            try:
                return time.time() - self.path.stat().st_mtime > _UNREADABLE_GRACE_S
            except FileNotFoundError:
                return True
        return other.get("host") == socket.gethostname() and not _pid_running(other["pid"])

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Ctrl-C / SIGTERM held back from creating the file to recording it as ours, so an interrupt
        # never leaves an empty lock behind; delivered when acquire returns (then __enter__ releases)
        masked = _block_signals()
        try:
            return self._acquire()
        finally:
            if masked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, masked)

    def _acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._holder()
                if other == {}:  # released in between
                    continue
                if self._stale(other):
                    who = f"pid {other.get('pid')}" if other else "an unreadable lock"
                    log.warning("taking over the lock %s left by %s (no longer running)", self.path, who)
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise FvlmError(
                    f"{self.path.parent} is in use by another {self.what} run (pid {other.get('pid')} on "
                    f"{other.get('host')}, started {other.get('started')}); wait for it to finish, or delete "
                    f"{self.path} if that run is gone") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._info(), f)
            self.held = True
            return self
        raise FvlmError(f"{self.path}: could not take the lock (other runs keep taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        other = self._holder()
        if other and other.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        try:
            return self.acquire()
        except BaseException:  # an interrupt delivered as acquire returned: __exit__ will not run
            self.release()
            raise

    def __exit__(self, *exc) -> None:
        self.release()
