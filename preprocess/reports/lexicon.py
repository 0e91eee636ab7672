"""Phrase matching on word tokens: one trie for anatomy terms, diagnosis phrases and cues.

Text is lower-cased and cut into word tokens (``[a-z0-9]+`` plus ``?``), so hyphens,
slashes and case never matter ("Ground-glass" == "ground glass"). Every phrase of the
lexicon, the taxonomy and the cue file goes into one token trie with its payloads (what
the phrase means: an anatomy, a diagnosis synonym, a negation cue...); matching takes the
longest phrase at each position, left to right, without overlaps, so "no pleural
effusion" beats "no", and "pulmonary artery" (no anatomy) beats "pulmonary" (lung).
Plurals of a phrase's last word are added when the phrase is loaded.
"""
from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["TOKEN_RE", "tokenize", "PhraseMatcher", "Match", "canonical"]

TOKEN_RE = re.compile(r"[a-z0-9]+|\?")
_END = "\0"


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def canonical(phrase: str) -> str:
    return " ".join(tokenize(phrase))


def _plurals(word: str) -> list[str]:
    if not word.isalpha() or len(word) < 3:
        return []
    if word.endswith("is"):                     # atelectasis, metastasis -> metastases
        return [word[:-2] + "es"]
    if word.endswith("um") and len(word) > 5:   # diverticulum -> diverticula
        return [word[:-2] + "a", word + "s"]
    if word.endswith("us") and len(word) > 5:   # calculus -> calculi
        return [word[:-2] + "i"]
    if word.endswith("a") and len(word) > 4:    # sequela -> sequelae, bulla -> bullae
        return [word + "e", word + "s"]
    if word.endswith("y") and word[-2] not in "aeiou":
        return [word[:-1] + "ies"]
    if word.endswith(("s", "x", "ch", "sh")):
        return [word + "es"]
    return [word + "s"]


class Match(NamedTuple):
    start: int          # first token index
    end: int            # one past the last token index
    payloads: object    # [(kind, value), ...], or what compile() made of them (shared: do not modify)
    phrase: str         # the canonical phrase that matched


class PhraseMatcher:
    """A token trie of phrases with payloads, matched longest-first."""

    def __init__(self):
        self._root: dict = {}
        self.size = 0

    def add(self, phrase: str, kind: str, value=None, plurals: bool = True) -> None:
        toks = tokenize(phrase)
        if not toks:
            return
        variants = [toks]
        if plurals:
            variants += [toks[:-1] + [p] for p in _plurals(toks[-1])]
        canon = " ".join(toks)
        for v in variants:
            node = self._root
            for t in v:
                node = node.setdefault(t, {})
            entry = node.get(_END)
            if entry is None:
                entry = node[_END] = [canon, []]
                self.size += 1
            if (kind, value) not in entry[1]:
                entry[1].append((kind, value))

    def compile(self, fn) -> None:
        """Replace every phrase's payload list by ``fn(canonical_phrase, payloads)`` (done once after loading)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            for k, v in node.items():
                if k == _END:
                    v[1] = fn(v[0], v[1])
                else:
                    stack.append(v)

    def match(self, tokens: list[str]) -> list[Match]:
        out = []
        root = self._root
        i, n = 0, len(tokens)
        while i < n:
            node = root.get(tokens[i])
            if node is None:
                i += 1
                continue
            best = None
            j = i
            while node is not None:
                j += 1
                e = node.get(_END)
                if e is not None:
                    best = (j, e)
                if j >= n:
                    break
                node = node.get(tokens[j])
            if best is None:
                i += 1
                continue
            out.append(Match(i, best[0], best[1][1], best[1][0]))
            i = best[0]
        return out
