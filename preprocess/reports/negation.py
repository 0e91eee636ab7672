"""NegEx-style scoping of negation and uncertainty cues within one clause, in linear time.

A clause is cut into comma segments. A *pre* cue ("no", "without", "possible") reaches
forward to the end of its segment and on through the following segments that are still
part of the same list: segments with no verb of their own ("No effusion, pneumothorax or
consolidation"), or that start with "or"/"nor"; when the cue's list has no verb at all, the
segment holding the list's verb closes it ("No infiltration, consolidation or mass was
observed"). A *post* cue ("was not observed", "cannot be excluded") reaches back to the
start of its segment and through earlier verb-less segments ("Pleural effusion,
pneumothorax were not observed"); a post *uncertainty* cue stays in its own segment. A
segment that starts with a severity or determiner word ("mild", "a", "there") starts a new
statement and ends a scope, as do scope-break words ("but", "however", "which"). When
several cues reach a token, the nearest one decides (a pre cue wins a tie).

Speed: the reach of a pre cue only grows with its position (a later cue's scope never ends
earlier), so the nearest pre cue covering a token is the last one before it, and one sweep
finds it; post cues likewise, per polarity, sweeping backwards. The cost is
O(tokens + segments + cues) per clause, whatever the number of cues (a report of 16,000
"No pleural effusion," clauses took minutes with the per-cue loops this replaces).
"""
from __future__ import annotations

__all__ = ["Cue", "scope", "scope_reference", "list_ends", "list_starts", "AFFIRM_STARTS", "CONTINUE_STARTS"]

#: a comma segment starting with one of these words is a new statement, not a list item
AFFIRM_STARTS = frozenset({
    "mild", "minimal", "small", "moderate", "severe", "large", "trace", "slight", "marked", "extensive",
    "a", "an", "the", "there", "new", "stable", "persistent", "again", "also", "however", "but", "scattered",
    "several", "multiple", "few", "some", "diffuse", "patchy", "bibasilar", "minor", "significant",
    "millimetric", "subcentimetric", "prominent", "probable", "possible", "likely", "it", "this", "which",
})
#: a comma segment starting with one of these continues the previous list
CONTINUE_STARTS = frozenset({"or", "nor"})


class Cue:
    """A cue occurrence: token span, polarity (0 negated, -1 uncertain) and direction."""
    __slots__ = ("start", "end", "value", "pre", "post", "phrase")

    def __init__(self, start: int, end: int, value: int, pre: bool, post: bool, phrase: str):
        self.start, self.end, self.value, self.pre, self.post, self.phrase = start, end, value, pre, post, phrase


def list_ends(seg_verb: list[bool], seg_first: list[str]) -> list[int]:
    """Per segment s, the last segment a pre cue in s reaches (non-decreasing in s)."""
    n = len(seg_verb)
    out = [0] * n
    plain_end = n - 1           # last segment of the verb-less list run starting after s
    verbless_to = n - 1         # last segment index such that s..verbless_to are all verb-less
    for s in range(n - 1, -1, -1):
        if s + 1 < n and not _joins(s + 1, seg_verb, seg_first):
            plain_end = s
        if seg_verb[s]:
            verbless_to = s - 1
        last = plain_end
        # a verb-less list closed by the segment holding its verb ("..., mass was observed")
        if (not seg_verb[s] and verbless_to >= last and last + 1 < n and seg_verb[last + 1]
                and seg_first[last + 1] not in AFFIRM_STARTS):
            last += 1
        out[s] = last
    return out


def list_starts(seg_verb: list[bool], seg_first: list[str]) -> list[int]:
    """Per segment s, the first segment a post negation cue in s reaches back to."""
    out = [0] * len(seg_verb)
    for s in range(len(seg_verb)):
        if s > 0 and not seg_verb[s - 1] and seg_first[s - 1] not in AFFIRM_STARTS:
            out[s] = out[s - 1]
        else:
            out[s] = s
    return out


def _joins(s: int, seg_verb: list[bool], seg_first: list[str]) -> bool:
    """Whether segment s continues the list of the segment before it."""
    first = seg_first[s]
    if first in CONTINUE_STARTS:
        return True
    return not seg_verb[s] and first not in AFFIRM_STARTS


def scope(n_tokens: int, seg_of: list[int], seg_verb: list[bool], seg_first: list[str],
          cues: list[Cue], breaks: list[int]) -> list[tuple[int, Cue] | None]:
    """For each token, the (distance, cue) of the nearest cue whose scope covers it, else None.

    Args:
        n_tokens: number of tokens in the clause.
        seg_of: segment index of each token (non-decreasing).
        seg_verb: per segment, whether it holds a verb of its own.
        seg_first: per segment, its first token ("" if empty).
        cues: cue occurrences in token order (non-overlapping).
        breaks: token indices of scope-break words.
    """
    out: list = [None] * n_tokens
    if not cues or not n_tokens:
        return out
    n_seg = len(seg_verb)
    is_break = [False] * n_tokens
    for b in breaks:
        if 0 <= b < n_tokens:
            is_break[b] = True
    seg_start = [n_tokens] * (n_seg + 1)
    for t in range(n_tokens - 1, -1, -1):
        seg_start[seg_of[t]] = t
    for s in range(n_seg - 1, -1, -1):          # empty segments start where the next one does
        seg_start[s] = min(seg_start[s], seg_start[s + 1])

    def seg_at(c: Cue) -> int:
        return seg_of[c.start] if c.start < n_tokens else n_seg - 1

    _pre_sweep(out, cues, seg_at, list_ends(seg_verb, seg_first), seg_start, is_break, n_tokens)
    starts = list_starts(seg_verb, seg_first)
    for value in sorted({c.value for c in cues if c.post}):
        first_seg = (lambda s: starts[s]) if value == 0 else (lambda s: s)
        _post_sweep(out, [c for c in cues if c.post and c.value == value], seg_at, first_seg, seg_start,
                    is_break)
    return out


def _pre_sweep(out, cues, seg_at, ends, seg_start, is_break, n_tokens) -> None:
    """Forward sweep: each token takes the last pre cue before it, while that cue's scope lasts."""
    pres = [c for c in cues if c.pre]
    k, cur, stop = 0, None, 0
    for t in range(n_tokens):
        while k < len(pres) and pres[k].end <= t:
            cur = pres[k]
            stop = seg_start[ends[seg_at(cur)] + 1]       # end of the cue's list
            k += 1
            # the first break at or after the cue's end closes its scope
            for u in range(cur.end, min(stop, t)):
                if is_break[u]:
                    stop = u
                    break
        if cur is None or t >= stop:
            continue
        if is_break[t]:
            stop = t
            continue
        out[t] = (t - cur.end, cur)


def _post_sweep(out, posts, seg_at, first_seg, seg_start, is_break) -> None:
    """Backward sweep for post cues of one polarity; a pre cue at the same distance keeps the token."""
    k = len(posts) - 1
    cur, stop = None, 0
    last = posts[-1].start - 1 if posts else -1
    for t in range(last, -1, -1):
        while k >= 0 and posts[k].start > t:
            cur = posts[k]
            stop = seg_start[first_seg(seg_at(cur))]      # first token the cue may reach
            k -= 1
            for u in range(cur.start - 1, max(stop, t + 1) - 1, -1):
                if is_break[u]:
                    stop = u + 1
                    break
        if cur is None or t < stop:
            continue
        if is_break[t]:
            stop = t + 1
            continue
        d = cur.start - 1 - t
        if out[t] is None or d < out[t][0]:
            out[t] = (d, cur)


def scope_reference(n_tokens: int, seg_of: list[int], seg_verb: list[bool], seg_first: list[str],
                    cues: list[Cue], breaks: list[int]) -> list[tuple[int, Cue] | None]:
    """The same result as :func:`scope` by walking every cue's scope token by token.

    Quadratic in the number of cues; kept only as the definition the fast sweep is checked
    against (tests, ``benchmarks/reports_bench.py``).
    """
    out: list = [None] * n_tokens
    n_seg = len(seg_verb)
    break_set = set(breaks)
    ends = list_ends(seg_verb, seg_first) if n_seg else []
    starts = list_starts(seg_verb, seg_first) if n_seg else []
    for cue in cues:
        s = seg_of[cue.start] if cue.start < n_tokens else n_seg - 1
        if cue.pre:
            for t in range(cue.end, n_tokens):
                if seg_of[t] > ends[s] or t in break_set:
                    break
                d = t - cue.end
                if out[t] is None or d < out[t][0]:
                    out[t] = (d, cue)
        if cue.post:
            first = starts[s] if cue.value == 0 else s
            for t in range(cue.start - 1, -1, -1):
                if seg_of[t] < first or t in break_set:
                    break
                d = cue.start - 1 - t
                if out[t] is None or d < out[t][0]:
                    out[t] = (d, cue)
    return out
