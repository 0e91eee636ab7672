"""Files that appear whole or not at all.

``with replacing(path) as tmp:`` -- write ``tmp`` (beside ``path``, same folder, so the rename is
atomic); on leaving the block ``tmp`` replaces ``path``. If the block raises, a Ctrl-C included,
``tmp`` is removed and ``path`` keeps what it held: an interrupted run leaves no ``.tmp`` behind.

A second Ctrl-C can land while that clean-up runs. So every temporary that is not yet renamed or
removed stays registered, and :func:`remove_leftovers` (called by ``fvlm.cli`` after an interrupt,
with signals ignored, and at interpreter exit) removes what is left. Staging folders (a checkpoint
being written) register with :func:`register` / :func:`unregister`.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["replacing", "register", "unregister", "remove_leftovers"]

_live: set[Path] = set()


def register(path: str | os.PathLike) -> None:
    """``path`` (a file or folder) is half-written until :func:`unregister`."""
    _live.add(Path(path))


def unregister(path: str | os.PathLike) -> None:
    _live.discard(Path(path))


def remove_leftovers() -> None:
    """Remove every registered temporary that is still there."""
    for p in list(_live):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        _live.discard(p)


atexit.register(remove_leftovers)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` that replaces it when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    register(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
        unregister(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        unregister(tmp)
        raise
