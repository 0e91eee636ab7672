"""Report sections: findings and impression from separate fields, or found by headers in free text.

Headers are a known word followed by a colon, at the start of the text, of a line or of a
sentence ("FINDINGS:", "Impression:", "CONCLUSION:", "Technique:", "Clinical history:").
Findings and impression feed the labels; every other section (technique, clinical
information, comparison, recommendation...) is kept as "other" but not labelled. Text
before the first header counts as findings when no findings header exists (many reports
start straight with the findings), otherwise as "other".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Section", "split_sections", "LABELLED"]

#: section kinds whose sentences are labelled
LABELLED = ("findings", "impression")

_KINDS = {
    "findings": ["findings", "finding", "report", "results", "result", "description", "observations",
                 "ct findings", "chest ct findings", "body"],
    "impression": ["impression", "impressions", "conclusion", "conclusions", "summary", "opinion",
                   "diagnosis", "diagnoses", "interpretation", "assessment", "final impression", "result and conclusion"],
    "other": ["technique", "techniques", "procedure", "protocol", "clinical information", "clinical history",
              "clinical data", "clinical indication", "clinical details", "clinical", "history", "indication",
              "indications", "reason for exam", "reason for examination", "reason", "comparison", "comparisons",
              "examination", "exam", "study", "contrast", "recommendation", "recommendations", "note", "notes",
              "addendum", "dose", "radiation dose", "patient", "date", "signed", "attending", "referring physician"],
}
_LOOKUP = {w: k for k, ws in _KINDS.items() for w in ws}
_HEADER = re.compile(
    r"(?:^|(?<=\n)|(?<=[.!?] )|(?<=[.!?]  ))[ \t]*(" + "|".join(
        re.escape(w).replace(r"\ ", r"\s+") for w in sorted(_LOOKUP, key=len, reverse=True)) + r")[ \t]*:",
    re.I)


@dataclass
class Section:
    kind: str          # "findings", "impression" or "other"
    header: str        # the header as written ("" for a field or the text before any header)
    text: str


def split_sections(text: str) -> list[Section]:
    """Sections of a free-text report, in order (empty sections dropped)."""
    if not text:
        return []
    matches = list(_HEADER.finditer(text))
    if not matches:
        return [Section("findings", "", text.strip())] if text.strip() else []
    has_findings = any(_LOOKUP[_norm(m.group(1))] == "findings" for m in matches)
    out = []
    pre = text[:matches[0].start()].strip()
    if pre:
        out.append(Section("other" if has_findings else "findings", "", pre))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end():end].strip()
        if body:
            out.append(Section(_LOOKUP[_norm(m.group(1))], m.group(1), body))
    return out


def _norm(h: str) -> str:
    return " ".join(h.lower().split())
