"""Radiology-safe sentence and clause splitting with nltk's Punkt, no download at run time.

Punkt runs with hand-set parameters (:data:`ABBREVIATIONS`, :data:`SENT_STARTERS`) instead of
the pickled English model, so nothing is fetched. Around it:

- newlines: blank lines always end a sentence; a single newline ends one unless the next line
  continues the previous (starts lower-case, or the previous line ends mid-phrase), which
  undoes the hard wrapping of US-style reports;
- list markers (``1.``, ``2)``, ``-``, ``*``) at a line start or after a sentence end start a
  new sentence and are dropped;
- decimals and measurements (``4.5 mm``, ``1.2 x 0.8 cm``) never split: a period splits only
  when followed by white space, and Punkt decides every period after an abbreviation,
  initial or number;
- clauses: semicolons always split; a colon splits when the text before it is longer than a
  short label ("Lungs: clear" stays one clause, so the label names its anatomy).

Speed: a block whose candidate boundaries all follow ordinary words is split with one
regular expression, which is exactly what Punkt would do there; only blocks with an
ambiguous period go through Punkt (the benchmark checks both give the same sentences).
"""
from __future__ import annotations

import re

from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

__all__ = ["SentenceSplitter", "regex_split", "ABBREVIATIONS", "SENT_STARTERS"]

#: abbreviations (lower-case, without the final period) Punkt must not split after
ABBREVIATIONS = frozenset({
    "e.g", "i.e", "eg", "ie", "approx", "appr", "vs", "v", "fig", "figs", "cf", "etc", "resp", "incl",
    "dr", "mr", "mrs", "ms", "prof", "st", "ca", "max", "min", "diam", "sag", "cor", "ax",
    "ser", "img", "im", "ref", "rt", "lt", "bilat", "est", "nr", "nos", "pt", "pts", "hx",
    "s.p", "sec", "seg", "segs", "ant", "sup", "inf", "med", "lat", "prox", "dist",
})
# Units ("mm", "cm") are deliberately not abbreviations: "measures 5 mm. The liver" is a
# sentence end far more often than "5 mm. in size" is not.

#: words that often start a report sentence; Punkt splits after an abbreviation when the
#: next word is one of these and capitalised
SENT_STARTERS = frozenset({
    "the", "there", "no", "a", "an", "in", "both", "bilateral", "mild", "small", "multiple", "left", "right",
    "heart", "liver", "lungs", "lung", "spleen", "kidneys", "kidney", "pancreas", "gallbladder", "aorta",
    "trachea", "mediastinum", "thoracic", "upper", "lower", "bone", "bones", "pleural", "pericardial",
    "impression", "findings", "conclusion", "this", "these", "it", "on", "at", "as", "when", "after",
    "moderate", "severe", "minimal", "diffuse", "stable", "new", "status", "mediastinal", "esophagus",
    "adrenal", "stomach", "urinary", "bladder", "visualized", "degenerative", "calcified", "calcific",
    "vertebral", "abdominal", "osseous", "soft", "subcutaneous", "nodular", "ground", "emphysematous",
    "atelectasis", "consolidation", "sequelae", "fibrotic", "millimetric", "nonspecific", "focal",
    "patchy", "linear", "interlobular", "peribronchial", "mosaic", "appearance", "aeration", "tracheostomy",
    "postoperative", "surgical", "cardiomegaly", "hiatal", "coronary", "atherosclerotic", "lymph",
})

_PARA = re.compile(r"\n[ \t]*\n+")
_LIST_LINE = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022\u25cf\u2013])\s+")
_INLINE_LIST = re.compile(r"(?:(?<=^)|(?<=[.;:!?])|(?<=[.;:!?][\"')\]]))\s+\(?\d{1,2}[.)]\s+(?=[A-Za-z(])")
_LIST_NUM = re.compile(r"\d[.)]\s")
_CONTINUES = re.compile(r"(?:[,(\-/]|\b(?:the|a|an|of|in|and|or|with|to|for|at|on|by|from|is|are|was|were|"
                        r"no|not|without|than|measuring|into|within|both|left|right))\s*$", re.I)
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+|[.!?]+[\"')\]]*$")
_SEMI = re.compile(r"\s*;\s*")
_COLON = re.compile(r"(?<!\d):(?!\d)\s*")
_WS = re.compile(r"[ \t\u00a0\u2009\u202f]+")
# a sentence made only of punctuation, numbers or a list marker carries nothing
_EMPTY = re.compile(r"^[\W\d_]*$")

_REGEX_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def regex_split(text: str) -> list[str]:
    """The plain baseline splitter: every ``.``, ``!`` or ``?`` followed by space, and newlines."""
    return [s.strip() for s in _REGEX_SPLIT.split(text) if s.strip()]


class SentenceSplitter:
    """Split report text into sentences and clauses.

    Args:
        abbreviations: extra abbreviations (lower-case, no final period) added to :data:`ABBREVIATIONS`.
        max_label_words: a colon after at most this many words is a label ("Lungs: clear"),
            kept with its clause; a longer text before a colon is split off.
    """

    def __init__(self, abbreviations=(), max_label_words: int = 4):
        params = PunktParameters()
        abbrevs = set(ABBREVIATIONS) | {a.lower().rstrip(".") for a in abbreviations}
        params.abbrev_types = abbrevs
        params.sent_starters = set(SENT_STARTERS)
        self._punkt = PunktSentenceTokenizer(params)
        self._abbrevs = abbrevs
        self.max_label_words = max_label_words

    # ------------------------------------------------------------------ blocks
    def blocks(self, text: str) -> list[str]:
        """Paragraph/line blocks with hard wraps undone and list markers removed."""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        out: list[str] = []
        for para in _PARA.split(text):
            cur = ""
            for line in para.split("\n"):
                stripped = line.strip()
                if not stripped:
                    continue
                is_item = bool(_LIST_LINE.match(stripped))
                if is_item:
                    stripped = _LIST_LINE.sub("", stripped, count=1)
                if cur and not is_item and (stripped[:1].islower() or _CONTINUES.search(cur)):
                    cur += " " + stripped
                else:
                    if cur:
                        out.append(cur)
                    cur = stripped
            if cur:
                out.append(cur)
        res = []
        for b in out:
            res.extend(self._split_inline_list(_WS.sub(" ", b)))
        return res

    def _split_inline_list(self, block: str) -> list[str]:
        """Split before inline list numbers ("... effusion. 2. Mild ...") unless the period
        before them ends an abbreviation ("Fig. 3) ...")."""
        if not _LIST_NUM.search(block):
            return [block]
        out, last = [], 0
        for m in _INLINE_LIST.finditer(block):
            if m.start() > 0:
                start = block.rfind(" ", 0, m.start()) + 1
                prev = block[start:m.start()].rstrip(".;:!?\"')]").lower().lstrip("(\"'[")
                if prev in self._abbrevs:
                    continue
            piece = block[last:m.start()].strip()
            if piece:
                out.append(piece)
            last = m.end()
        tail = block[last:].strip()
        if tail:
            out.append(tail)
        return out

    # ------------------------------------------------------------------ sentences
    def _ambiguous(self, block: str) -> bool:
        """True if some candidate boundary follows an abbreviation, initial, number or dotted word."""
        abbrevs = self._abbrevs
        for w in block.split():
            if w[-1] not in ".!?\"')]":
                continue
            core = w.rstrip("\"')]").rstrip(".!?").lstrip("(\"'[")
            if not core:
                continue
            if len(core) == 1 or core[-1].isdigit() or "." in core or core.lower() in abbrevs:
                return True
        return False

    def sentences(self, text: str) -> list[str]:
        """Sentences of ``text`` (any length; newlines and list markers handled)."""
        out = []
        for block in self.blocks(text):
            if self._ambiguous(block):
                parts = self._punkt.tokenize(block)
            else:
                parts = _split_keep(_BOUNDARY, block)
            out.extend(p.strip() for p in parts if p.strip() and not _EMPTY.match(p.strip()))
        return out

    def punkt_sentences(self, text: str) -> list[str]:
        """Punkt on every block, no fast path (reference for tests and the benchmark)."""
        out = []
        for block in self.blocks(text):
            out.extend(p.strip() for p in self._punkt.tokenize(block) if p.strip() and not _EMPTY.match(p.strip()))
        return out

    # ------------------------------------------------------------------ clauses
    def clauses(self, sentence: str) -> list[str]:
        """Split a sentence at semicolons, and at colons that follow more than a short label."""
        if ";" not in sentence and ":" not in sentence:
            c = sentence.strip(" ,")
            return [c] if c and not _EMPTY.match(c) else []
        out = []
        for part in _SEMI.split(sentence):
            part = part.strip()
            if not part:
                continue
            pieces = _COLON.split(part)
            if len(pieces) == 1:
                out.append(part)
                continue
            cur = pieces[0]
            for nxt in pieces[1:]:
                if len(cur.split()) <= self.max_label_words and not _ends_sentence(cur):
                    cur = f"{cur}: {nxt}" if nxt else cur + ":"
                else:
                    out.append(cur)
                    cur = nxt
            out.append(cur)
        return [c.strip(" ,") for c in out if c.strip(" ,") and not _EMPTY.match(c)]


def _ends_sentence(s: str) -> bool:
    return s.rstrip().endswith((".", "!", "?"))


def _split_keep(pattern: re.Pattern, text: str) -> list[str]:
    """Split after each match of ``pattern``, keeping the matched punctuation with the left part."""
    out, last = [], 0
    for m in pattern.finditer(text):
        end = m.end()
        seg = text[last:end].strip()
        if seg:
            out.append(seg)
        last = end
    tail = text[last:].strip()
    if tail:
        out.append(tail)
    return out
