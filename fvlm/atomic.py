"""Files that appear whole or not at all.

``with replacing(path) as tmp:`` -- write ``tmp`` (beside ``path``, same folder, so the rename is
atomic); on leaving the block ``tmp`` replaces ``path``. If the block raises, a Ctrl-C included,
``tmp`` is removed and ``path`` keeps what it held: an interrupted run leaves no ``.tmp`` behind.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["replacing"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` that replaces it when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
