"""Radiology report labeler: sections, sentences, anatomy assignment, negation, labels.

    from preprocess.reports import ReportLabeler
    lab = ReportLabeler("fvlm54")
    out = lab.label(findings="...", impressions="...")     # or text="..."
    out.labels; out.anatomies; out.global_sentences; out.to_json(); out.explain()

Used by ``fvlm preprocess`` (per-anatomy sentences, status and labels in the shards) and by
``fvlm reports label|explain``. Configuration lives in ``configs/anatomy/lexicon.yaml``,
``configs/reports/cues.yaml`` and the taxonomies under ``configs/diagnoses/``.
"""
from .labeler import (DISAGREEMENT_RULES, STATUSES, AnatomyText, ClauseResult, LabelResult, Mention,
                      ReportLabeler)
from .sections import Section, split_sections
from .sentences import SentenceSplitter, regex_split

__all__ = ["ReportLabeler", "LabelResult", "AnatomyText", "ClauseResult", "Mention", "STATUSES",
           "DISAGREEMENT_RULES", "SentenceSplitter", "regex_split", "Section", "split_sections"]
