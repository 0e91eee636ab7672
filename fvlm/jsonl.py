"""JSON Lines: one JSON value a line, blank lines skipped, every problem named by file and line.

The one reader of ``.jsonl`` files (shard indexes, manifests, label files, report files).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import FvlmError


def jsonl_lines(raw: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """Each non-blank line of JSON Lines bytes: ``(line number, value, None)``, or
    ``(line number, None, why)`` for a line that is not UTF-8 or not JSON (the caller
    decides whether that stops the read)."""
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8 text (byte {e.start})"
            continue
        try:
            yield n, json.loads(text), None
        except json.JSONDecodeError as e:
            yield n, None, f"not valid JSON ({e.msg} at column {e.colno})"


def read_jsonl(path: str | os.PathLike, error: type[FvlmError] = FvlmError,
               objects: bool = False) -> list[tuple[int, Any]]:
    """``[(line number, value), ...]`` of a JSON Lines file; the first bad line raises ``error``
    ``"<path>:<line>: ..."``. ``objects``: every line must be a JSON object."""
    rows = []
    for n, obj, why in jsonl_lines(Path(path).read_bytes()):
        if why is not None:
            raise error(f"{path}:{n}: {why}")
        if objects and not isinstance(obj, dict):
            raise error(f"{path}:{n}: each line must be a JSON object")
        rows.append((n, obj))
    return rows
