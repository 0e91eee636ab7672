"""NegEx-style scoping of negation and uncertainty cues within one clause.

A clause is cut into comma segments. A *pre* cue ("no", "without", "possible") reaches
forward to the end of its segment and on through the following segments that are still
part of the same list: segments with no verb of their own ("No effusion, pneumothorax or
consolidation"), or that start with "or"/"nor". A *post* cue ("was not observed",
"cannot be excluded") reaches back to the start of its segment and through earlier
verb-less segments ("Pleural effusion, pneumothorax were not observed"); a post
*uncertainty* cue stays in its own segment. A segment that
starts with a severity or determiner word ("mild", "a", "there") starts a new statement
and ends a scope, as do scope-break words ("but", "however", "which"). When several cues
reach a token, the nearest one decides.
"""
from __future__ import annotations

__all__ = ["Cue", "scope", "AFFIRM_STARTS", "CONTINUE_STARTS"]

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


def scope(n_tokens: int, seg_of: list[int], seg_verb: list[bool], seg_first: list[str],
          cues: list[Cue], breaks: list[int]) -> list[tuple[int, Cue] | None]:
    """For each token, the (distance, cue) of the nearest cue whose scope covers it, else None.

    Args:
        n_tokens: number of tokens in the clause.
        seg_of: segment index of each token.
        seg_verb: per segment, whether it holds a verb of its own.
        seg_first: per segment, its first token ("" if empty).
        cues: cue occurrences in token order.
        breaks: token indices of scope-break words.
    """
    out: list = [None] * n_tokens
    if not cues:
        return out
    n_seg = len(seg_verb)
    break_set = set(breaks)

    def joins(s: int) -> bool:
        """Whether segment s continues the list of the segment before it."""
        first = seg_first[s]
        if first in CONTINUE_STARTS:
            return True
        return not seg_verb[s] and first not in AFFIRM_STARTS

    for cue in cues:
        if cue.pre:
            s = seg_of[cue.start] if cue.start < n_tokens else n_seg - 1
            last_seg = s
            while last_seg + 1 < n_seg and joins(last_seg + 1):
                last_seg += 1
            for t in range(cue.end, n_tokens):
                if seg_of[t] > last_seg or t in break_set:
                    break
                d = t - cue.end
                if out[t] is None or d < out[t][0]:
                    out[t] = (d, cue)
        if cue.post:
            s = seg_of[cue.start] if cue.start < n_tokens else n_seg - 1
            first_seg = s
            # only negation lists run back over commas ("Effusion, pneumothorax were not seen");
            # a hedge qualifies its own segment ("Opacity in the RLL, pneumonia cannot be excluded")
            while cue.value == 0 and first_seg > 0 and not seg_verb[first_seg - 1] and seg_first[first_seg - 1] not in AFFIRM_STARTS:
                first_seg -= 1
            for t in range(cue.start - 1, -1, -1):
                if seg_of[t] < first_seg or t in break_set:
                    break
                d = cue.start - 1 - t
                if out[t] is None or d < out[t][0]:
                    out[t] = (d, cue)
    return out
