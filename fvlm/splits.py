"""Split names: ``val``/``valid``/``validation``/``dev`` are one split, as are ``test``/``testing`` and
``train``/``training``. Every reader that picks cases by split (pretraining validation, the zero-shot
suite) resolves names here, so shards written as ``val`` are found by a config that says ``valid``.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["SPLIT_ALIASES", "same_split", "split_aliases", "resolve_split_ids"]

SPLIT_ALIASES: tuple[tuple[str, ...], ...] = (("val", "valid", "validation", "dev"), ("test", "testing"),
                                              ("train", "training"))


def split_aliases(name: str) -> tuple[str, ...]:
    """``name`` first, then the other spellings of the same split."""
    low = str(name).lower()
    for group in SPLIT_ALIASES:
        if low in group:
            return (str(name),) + tuple(a for a in group if a != str(name))
    return (str(name),)


def same_split(a: str, b: str) -> bool:
    """Whether two split names denote the same split (case-insensitive, aliases above)."""
    return str(b).lower() in {x.lower() for x in split_aliases(a)}


def resolve_split_ids(source, name: str) -> tuple[str | None, list[str]]:
    """``(name as stored, case ids)`` of split ``name`` in a source with ``case_ids(split)``.

    The requested spelling wins; otherwise the first alias with cases. ``(None, [])`` when no
    spelling of the split has cases.
    """
    for alias in split_aliases(name):
        ids = list(source.case_ids(alias))
        if ids:
            return alias, ids
    return None, []


def names_in(splits: Sequence[str], name: str) -> list[str]:
    """The entries of ``splits`` that are ``name`` under the aliases."""
    return [s for s in splits if same_split(name, s)]
