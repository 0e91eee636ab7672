"""One temporary folder per process: ``<tmp>/fvlm-tmp-<host>-<pid>/``, removed at exit.

Every temporary file fvlm makes (the test text model's word list, in-memory scans written as
NIfTI for the preprocess path) goes under it. A process killed before its exit handler ran
leaves its folder behind; the next fvlm process on the same host removes the folders of dead
processes when it makes its own.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["process_temp_dir", "remove_stale"]

PREFIX = "fvlm-tmp-"
#: folders of earlier fvlm versions (one per text-model load, never removed); swept when this old
_LEGACY = ("fvlm_vocab_*", "fvlm_scan_*")
_LEGACY_AGE_S = 3600.0

_dir: Path | None = None
_pid: int | None = None


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the temporary folders of dead fvlm processes of this host (and old leftovers of
    earlier versions) under ``root`` (default: the system temp dir) -> what was removed."""
    root = Path(root or tempfile.gettempdir())
    mine = f"{PREFIX}{_host()}-"
    gone = []
    for p in root.glob(f"{mine}*"):
        pid = p.name[len(mine):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    now = time.time()
    for pat in _LEGACY:
        for p in root.glob(pat):
            try:
                old = now - p.stat().st_mtime > _LEGACY_AGE_S
            except OSError:
                continue
            if old and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def process_temp_dir() -> Path:
    """This process's temporary folder (made on first use, removed at exit)."""
    global _dir, _pid
    if _dir is not None and _pid == os.getpid() and _dir.is_dir():
        return _dir
    root = Path(tempfile.gettempdir())
    try:
        remove_stale(root)
    except OSError:
        pass
    d = root / f"{PREFIX}{_host()}-{os.getpid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    if _pid != os.getpid():
        atexit.register(shutil.rmtree, d, True)
    _dir, _pid = d, os.getpid()
    return d
