"""The report labeler: sections -> sentences -> clauses -> anatomies, diagnosis labels, statuses.

    lab = ReportLabeler("fvlm54")                 # or "ctrate18", a path, or a Taxonomy
    out = lab.label(findings="...", impressions="...")   # or text="FINDINGS: ... IMPRESSION: ..."
    out.labels        # {diagnosis_id: 1 | 0 | -1}   (every diagnosis of the taxonomy)
    out.anatomies     # {anatomy_id: AnatomyText(status, sentences)}  (every anatomy of the set)
    out.global_sentences, out.other_sentences, out.to_json(), out.explain()

Rules (also in docs/FORMATS.md):

- A clause goes to the anatomies it names (lexicon terms, or the anatomy of a diagnosis it
  names); a clause naming none (and no structure outside the set, like "thyroid") takes the
  anatomies of the clause before it in the same sentence ("Liver: 2 cm lesion; likely a cyst").
  A clause naming two or more anatomies is cut at commas and conjunctions into parts that
  each have their own statement ("The liver is enlarged, the spleen is normal"); a list of
  organs sharing one statement stays whole ("Liver, spleen and pancreas are normal").
- A diagnosis mention is 0 inside a negation scope or with a per-diagnosis negation phrase,
  -1 inside an uncertainty scope, 1 otherwise; generic words ("nodule", "cyst") count only
  for a diagnosis whose anatomy (or context term) the clause names, and are also negated by
  a "normal" cue in their comma segment.
- Per anatomy: ``abnormal`` if any clause about it holds an affirmed or uncertain finding
  (a taxonomy diagnosis or a generic abnormality word), else ``normal`` if some clause is
  about it, else ``not_mentioned``.
- Labels: per section 1 if any mention is 1, else -1 if any is -1, else 0 (not mentioned
  is 0). Findings and impression are combined by ``disagreement``: ``positive_wins`` (the
  same rule over both) or ``impression_wins`` (the impression's value wherever it mentions
  the diagnosis, else the findings').
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum

from fvlm.errors import FvlmError
from fvlm.taxonomy import ABNORMAL, GLOBAL, NORMAL, NOT_MENTIONED, STATUSES, Taxonomy, _load_anatomy_set, load_taxonomy

from .lexicon import TOKEN_RE, PhraseMatcher, canonical, _plurals
from .negation import Cue, scope
from .sections import LABELLED, Section, split_sections
from .sentences import SentenceSplitter

__all__ = ["ReportLabeler", "LabelResult", "AnatomyText", "Mention", "ClauseResult", "STATUSES",
           "DISAGREEMENT_RULES"]

#: default per-section size cap in characters (CT-RATE reports: about 1,000-5,000)
MAX_CHARS = 100_000
log = logging.getLogger("fvlm.reports")
DISAGREEMENT_RULES = ("positive_wins", "impression_wins")


class MatchKind(str, Enum):
    """What a phrase the matcher finds stands for (a phrase may carry several)."""
    ANATOMY = "anat"               # an anatomy term of the lexicon
    NO_ANATOMY = "none"            # a lexicon term of no anatomy (``_none``)
    NEG_PRE = "npre"               # negation cue before its scope ("no ...")
    NEG_POST = "npost"             # negation cue after it ("... is not seen")
    UNC_PRE = "upre"               # uncertainty cue before its scope
    UNC_POST = "upost"             # uncertainty cue after it
    NORMAL = "normal"              # a "normal" cue of its comma segment
    BREAK = "break"                # scope break
    ABNORMAL = "abn"               # a generic abnormality word
    SYNONYM = "syn"                # a diagnosis synonym
    CONTEXT = "ctx"                # a diagnosis context synonym (needs its anatomy or terms)
    DIAG_NEG = "dneg"              # a diagnosis's own negation phrase
    DIAG_UNC = "dunc"              # a diagnosis's own uncertainty phrase
    EXCLUDE = "excl"               # a phrase that excludes a diagnosis
    TERM = "term"                  # a context term


K = MatchKind
# the kinds _analyze compares per match, bound once (an Enum attribute lookup is slow in a hot loop)
_SYN, _CTX, _DNEG, _DUNC = K.SYNONYM, K.CONTEXT, K.DIAG_NEG, K.DIAG_UNC
_CUE_KINDS = {K.NEG_PRE: (0, True, False), K.NEG_POST: (0, False, True), K.UNC_PRE: (-1, True, False),
              K.UNC_POST: (-1, False, True)}
_PRED_KINDS = frozenset({K.NEG_PRE, K.NEG_POST, K.UNC_PRE, K.UNC_POST, K.NORMAL, K.DIAG_NEG, K.DIAG_UNC})
_SPLIT_WORDS = ("and", "while", "whereas", "but", "however", "also")
# cut before a conjunction word or at a comma; the conjunction stays with the right part
# comma segments for scoping; a parenthesis is its own segment, so a hedge inside it
# ("mosaic attenuation (small airway disease?)") qualifies only the parenthetical
_SEGMENT_RE = re.compile(r"[,()]")
_SPLIT_RE = re.compile(r",\s*|\s+(?=(?:" + "|".join(_SPLIT_WORDS) + r")\s)", re.I)


@dataclass
class AnatomyText:
    status: str = NOT_MENTIONED
    sentences: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"status": self.status, "sentences": list(self.sentences)}


@dataclass
class Mention:
    """One diagnosis mention in a clause and why it got its value."""
    diagnosis: str           # diagnosis id
    value: int               # 1, 0, -1
    phrase: str              # the words that named it
    cue: str | None          # the negation/uncertainty/normal cue that decided, or None (affirmed)
    kind: str                # "synonym", "context", "negation phrase", "uncertainty phrase"


@dataclass
class ClauseResult:
    section: str
    sentence: str
    text: str
    anatomies: list[str]
    status: dict[str, str]
    mentions: list[Mention]


@dataclass
class LabelResult:
    labels: dict[str, int]
    anatomies: dict[str, AnatomyText]
    global_sentences: list[str]
    other_sentences: list[str]
    clauses: list[ClauseResult]
    taxonomy: Taxonomy
    section_labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def labels_by_name(self) -> dict[str, int]:
        return {self.taxonomy.diagnosis(k).name: v for k, v in self.labels.items()}

    def to_json(self, keys: str = "name") -> dict:
        """The LABELS.jsonl record body (without ``id``); labels keyed by diagnosis ``name`` or ``id``."""
        if keys not in ("name", "id"):
            raise FvlmError(f"label keys must be 'name' or 'id', got {keys!r}")
        return {
            "labels": self.labels_by_name() if keys == "name" else dict(self.labels),
            "anatomies": {a: t.to_json() for a, t in self.anatomies.items()},
            "global_sentences": list(self.global_sentences),
        }

    def explain(self) -> dict:
        """Per clause: section, text, anatomies, statuses and each label with the cue that decided it."""
        return {
            "taxonomy": self.taxonomy.name,
            "clauses": [{
                "section": c.section, "sentence": c.sentence, "clause": c.text, "anatomies": c.anatomies,
                "status": c.status,
                "labels": [{"diagnosis": m.diagnosis, "name": self.taxonomy.diagnosis(m.diagnosis).name,
                            "value": m.value, "phrase": m.phrase, "kind": m.kind, "cue": m.cue}
                           for m in c.mentions],
            } for c in self.clauses],
            "labels": {k: v for k, v in self.labels.items() if v != 0},
            "section_labels": {s: {k: v for k, v in lab.items() if v != 0} for s, lab in self.section_labels.items()},
        }


class _Entry:
    __slots__ = ("anats", "implied", "none", "diags", "cue", "normal", "brk", "abn", "pred")


class _Analysis:
    __slots__ = ("assign", "anats", "pred", "mentions", "abnormal", "has_none")


class _Hits:
    """A clause's matched phrases gathered by kind (see :meth:`ReportLabeler._hits`)."""
    __slots__ = ("anats", "seg_anats", "implied", "has_none", "pred", "cues", "breaks", "normal_segs",
                 "phrases", "diags", "abn")

    def __init__(self):
        self.anats: set = set()
        self.seg_anats: dict[int, set] = {}
        self.implied: set = set()
        self.has_none = False
        self.pred = False
        self.cues: list[Cue] = []
        self.breaks: list[int] = []
        self.normal_segs: set = set()
        self.phrases: set = set()
        self.diags: list = []           # (match, MatchKind, diagnosis id)
        self.abn: list = []             # matches of generic abnormality words


class ReportLabeler:
    """Label radiology reports with a taxonomy's diagnoses and per-anatomy text and status.

    Args:
        taxonomy: ``"fvlm54"``, ``"ctrate18"``, a YAML path or a loaded :class:`Taxonomy`.
        anatomy_set: anatomies that receive sentences (default: the taxonomy's); with
            ``"ctrate4"`` sentences about other anatomies go to the whole-report text.
        disagreement: how findings and impression combine (see module doc).
        uncertain: ``keep`` (-1 stays), ``positive`` or ``negative`` (-1 written as 1 / 0).
        abbreviations: extra abbreviations for the sentence splitter.
        max_chars: a report section longer than this (characters) is cut at the last word
            boundary before it, with a logged warning (0: no cap); real reports are a few
            thousand characters, so only a pathological input is cut.
    """

    #: the negation/uncertainty scope function (``negation.scope_reference`` gives the same result, slowly)
    scope_fn = staticmethod(scope)

    def __init__(self, taxonomy="fvlm54", anatomy_set: str | None = None,
                 disagreement: str = "positive_wins", uncertain: str = "keep", abbreviations=(),
                 max_chars: int = MAX_CHARS):
        self.taxonomy = load_taxonomy(taxonomy)
        if max_chars < 0:
            raise FvlmError(f"max_chars must be >= 0, got {max_chars}")
        self.max_chars = int(max_chars)
        if disagreement not in DISAGREEMENT_RULES:
            raise FvlmError(f"disagreement must be one of {', '.join(DISAGREEMENT_RULES)}, got {disagreement!r}")
        if uncertain not in ("keep", "positive", "negative"):
            raise FvlmError(f"uncertain must be keep, positive or negative, got {uncertain!r}")
        self.disagreement = disagreement
        self.uncertain = uncertain
        if anatomy_set and anatomy_set != self.taxonomy.anatomy_set:
            self.anatomy_ids = [a.id for a in _load_anatomy_set(anatomy_set)]
        else:
            self.anatomy_ids = self.taxonomy.anatomy_ids
        self.anatomy_set = anatomy_set or self.taxonomy.anatomy_set
        self._in_set = frozenset(self.anatomy_ids)
        self.splitter = SentenceSplitter(abbreviations=abbreviations)
        self._diag = {d.id: d for d in self.taxonomy.diagnoses}
        self._build()

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        m = PhraseMatcher()
        lex = self.taxonomy.lexicon.get("terms", {}) if self.taxonomy.lexicon else {}
        if not lex:
            raise FvlmError(f"taxonomy '{self.taxonomy.name}' has no anatomy lexicon (set 'lexicon:')")
        for anat, terms in lex.items():
            for t in terms or ():
                m.add(str(t), K.NO_ANATOMY if anat == "_none" else K.ANATOMY, None if anat == "_none" else anat)
        cues = self.taxonomy.cues or {}
        for key, kind in (("negation_pre", K.NEG_PRE), ("negation_post", K.NEG_POST), ("uncertainty_pre", K.UNC_PRE),
                          ("uncertainty_post", K.UNC_POST), ("normal", K.NORMAL), ("scope_break", K.BREAK),
                          ("abnormal", K.ABNORMAL)):
            for p in cues.get(key, ()) or ():
                m.add(str(p), kind, None, plurals=(kind == K.ABNORMAL))
        self._verbs = frozenset(canonical(v) for v in cues.get("verbs", ()) or ())
        # words between a negation cue and a scope break that keep the negation going:
        # "no finding compatible with pneumonia" negates pneumonia
        self._bridge = frozenset(canonical(v) for v in cues.get("negation_bridge", ()) or ())
        self._yields = {d.id: frozenset(d.yields_to) for d in self.taxonomy.diagnoses if d.yields_to}
        # a per-diagnosis negation phrase that opens/closes like a cue ("no pleural effusion")
        # also scopes like one: "No pleural effusion, pneumothorax or consolidation"
        self._neg_first = frozenset(canonical(p).split()[0] for p in cues.get("negation_pre", ()) or ()
                                    if canonical(p))
        self._neg_last = frozenset(canonical(p).split()[-1] for p in cues.get("negation_post", ()) or ()
                                   if canonical(p))
        for d in self.taxonomy.diagnoses:
            for p in d.synonyms:
                m.add(p, K.SYNONYM, d.id)
            for p in d.context_synonyms:
                m.add(p, K.CONTEXT, d.id)
            for p in d.negation:
                m.add(p, K.DIAG_NEG, d.id, plurals=False)
            for p in d.uncertainty:
                m.add(p, K.DIAG_UNC, d.id, plurals=False)
            for p in d.exclude:
                m.add(p, K.EXCLUDE, d.id)
            for p in d.context_terms:
                m.add(p, K.TERM, None)
        m.compile(self._compile)
        self._matcher = m
        # context terms as the canonical phrases the matcher reports
        self._ctx_terms: dict[str, frozenset] = {}
        for d in self.taxonomy.diagnoses:
            if d.context_terms:
                canon = set()
                for p in d.context_terms:
                    toks = canonical(p).split()
                    for v in [toks] + [toks[:-1] + [q] for q in _plurals(toks[-1])]:
                        c = self._canon_of(v)
                        if c:
                            canon.add(c)
                self._ctx_terms[d.id] = frozenset(canon)

    def _compile(self, phrase: str, payloads: list) -> "_Entry":
        """Fold a phrase's payloads into what _analyze needs, once, at load time."""
        e = _Entry()
        kinds = {k for k, _ in payloads}
        excluded = K.EXCLUDE in kinds
        e.anats = tuple(v for k, v in payloads if k == K.ANATOMY)
        e.none = K.NO_ANATOMY in kinds
        e.diags = tuple((k, v) for k, v in payloads
                        if k in (K.DIAG_NEG, K.DIAG_UNC) or (k in (K.SYNONYM, K.CONTEXT) and not excluded))
        e.implied = tuple(sorted({self._diag[v].anatomy for k, v in e.diags
                                  if k != K.CONTEXT and self._diag[v].anatomy != GLOBAL}))
        cue_val, pre, post = None, False, False
        for k, _ in payloads:
            if k in _CUE_KINDS:
                v, p, q = _CUE_KINDS[k]
                cue_val = v if cue_val is None else min(cue_val, v)     # uncertainty wins a tie
                pre, post = pre or p, post or q
        if cue_val is None and K.DIAG_NEG in kinds:
            words = phrase.split()
            p, q = words[0] in self._neg_first, words[-1] in self._neg_last
            if p or q:
                cue_val, pre, post = 0, p, q
        e.cue = (cue_val, pre, post) if cue_val is not None else None
        e.normal = K.NORMAL in kinds
        e.brk = K.BREAK in kinds
        e.abn = K.ABNORMAL in kinds and not excluded
        e.pred = bool(kinds & _PRED_KINDS)
        return e

    def _canon_of(self, toks: list[str]) -> str | None:
        node = self._matcher._root
        for t in toks:
            node = node.get(t)
            if node is None:
                return None
        e = node.get("\0")
        return e[0] if e else None

    # ------------------------------------------------------------------ one clause
    def _analyze(self, text: str, inherited: frozenset = frozenset()) -> _Analysis:
        """One clause: its anatomies, its diagnosis mentions (with values) and its abnormal anatomies.
        ``inherited``: the anatomies of the clause before, for a clause that names none."""
        toks, seg_of, seg_verb, seg_first = self._segments(text)
        h = self._hits(self._matcher.match(toks), seg_of, seg_verb)
        assign = h.anats | h.implied
        if not assign and not h.has_none and inherited:
            assign = set(inherited)
        breaks = h.breaks
        if h.cues and breaks and self._bridge:
            breaks = self._bridged(toks, h.cues, breaks)
        scopes = self.scope_fn(len(toks), seg_of, seg_verb, seg_first, h.cues, breaks) if h.cues else None
        mentions, default_anats = self._mentions(h, assign, scopes, seg_of)
        if self._yields and mentions:
            mentions = self._apply_yields(mentions, h.anats)
        if default_anats:
            # "Millimetric nodules." in a chest report: the default anatomy of the generic word
            assign = assign | default_anats
        res = _Analysis()
        res.assign, res.anats, res.pred, res.mentions = assign, h.anats | h.implied, h.pred, mentions
        res.abnormal, res.has_none = self._abnormal(h, mentions, assign, scopes, seg_of), h.has_none
        return res

    def _segments(self, text: str) -> tuple[list[str], list[int], list[bool], list[str]]:
        """Tokens of a clause, each token's comma segment, and per segment: has a verb, first token."""
        toks: list[str] = []
        seg_of: list[int] = []
        seg_verb: list[bool] = []
        seg_first: list[str] = []
        verbs = self._verbs
        findall = TOKEN_RE.findall
        for si, part in enumerate(_SEGMENT_RE.split(text.lower())):
            ts = findall(part)
            toks.extend(ts)
            seg_of.extend([si] * len(ts))
            seg_first.append(ts[0] if ts else "")
            seg_verb.append(not verbs.isdisjoint(ts))
        return toks, seg_of, seg_verb, seg_first

    def _hits(self, matches, seg_of: list[int], seg_verb: list[bool]) -> _Hits:
        """What the matched phrases of a clause say, gathered by kind."""
        h = _Hits()
        h.pred = True in seg_verb
        for mt in matches:
            e = mt.payloads                 # an _Entry (see _compile)
            h.phrases.add(mt.phrase)
            si = seg_of[mt.start]
            if e.anats:
                h.anats.update(e.anats)
                h.seg_anats.setdefault(si, set()).update(e.anats)
            if e.implied:
                h.implied.update(e.implied)
                h.seg_anats.setdefault(si, set()).update(e.implied)
            if e.none:
                h.has_none = True
            for kind, val in e.diags:
                h.diags.append((mt, kind, val))
            if e.pred:
                h.pred = True
            if e.cue is not None:
                h.cues.append(Cue(mt.start, mt.end, e.cue[0], e.cue[1], e.cue[2], mt.phrase))
            if e.normal:
                h.normal_segs.add(si)
            if e.brk:
                h.breaks.append(mt.start)
            if e.abn:
                h.abn.append(mt)
        return h

    def _mentions(self, h: _Hits, ctx_anats: set, scopes, seg_of: list[int]) -> tuple[list[Mention], set]:
        """The clause's diagnosis mentions with their values (1, 0, -1), and the default anatomies
        that generic context words brought in."""
        diag = self._diag
        mentions: list[Mention] = []
        default_anats: set = set()
        for mt, kind, did in h.diags:
            d = diag[did]
            if kind is _CTX:
                terms = self._ctx_terms.get(did)
                if terms is not None:
                    if not (terms & h.phrases):
                        continue
                elif d.anatomy not in ctx_anats:
                    if not (d.context_default and not ctx_anats and not h.has_none):
                        continue
                    default_anats.add(d.anatomy)
            if kind is _DNEG:
                mentions.append(Mention(did, 0, mt.phrase, mt.phrase, "negation phrase"))
                continue
            if kind is _DUNC:
                mentions.append(Mention(did, -1, mt.phrase, mt.phrase, "uncertainty phrase"))
                continue
            how = "synonym" if kind is _SYN else "context"
            sc = scopes[mt.start] if scopes else None
            if sc is not None:
                mentions.append(Mention(did, sc[1].value, mt.phrase, sc[1].phrase, how))
            elif kind is _CTX and seg_of[mt.start] in h.normal_segs:
                mentions.append(Mention(did, 0, mt.phrase, "normal", "context"))
            else:
                mentions.append(Mention(did, 1, mt.phrase, None, how))
        return mentions, default_anats

    def _abnormal(self, h: _Hits, mentions: list[Mention], assign: set, scopes, seg_of: list[int]) -> set:
        """Anatomies the clause calls abnormal: those of its positive or uncertain mentions, and those
        of a generic abnormality word outside a normal segment and outside a negation."""
        abnormal: set = set()
        for m in mentions:
            if m.value != 0:
                a = self._diag[m.diagnosis].anatomy
                if a in assign:
                    abnormal.add(a)
        for mt in h.abn:
            s = seg_of[mt.start]
            if s in h.normal_segs:
                continue
            sc = scopes[mt.start] if scopes else None
            if sc is not None and sc[1].value == 0:
                continue
            abnormal |= h.seg_anats.get(s) or assign
        return abnormal

    def _bridged(self, toks: list[str], cues: list[Cue], breaks: list[int]) -> list[int]:
        """Breaks minus those reached from a pre negation cue over bridge words only."""
        ends = {c.end for c in cues if c.pre and c.value == 0}
        bridge = self._bridge
        keep = []
        for b in breaks:
            t = b
            while t > 0 and t not in ends and toks[t - 1] in bridge:
                t -= 1
            if t not in ends:
                keep.append(b)
        return keep

    def _apply_yields(self, mentions: list[Mention], named: set) -> list[Mention]:
        """Drop a mention of a diagnosis whose ``yields_to`` diagnosis is affirmed in the clause:
        a context mention when that diagnosis lies in the same anatomy ("density increases
        consistent with sequelae" is the sequela, not an opacity); any mention when it lies in
        another anatomy and the clause does not name the diagnosis' own anatomy ("plaques in the coronary arteries" is coronary, not aortic, calcification;
        "plaques in the aorta and coronary arteries" is both)."""
        affirmed = {m.diagnosis for m in mentions if m.value == 1}
        diag = self._diag
        out = []
        for m in mentions:
            y = self._yields.get(m.diagnosis)
            if y and m.value != 0:
                anat = diag[m.diagnosis].anatomy
                hit = [o for o in y & affirmed]
                same = any(diag[o].anatomy == anat for o in hit)
                if (same and m.kind == "context") or (hit and not same and anat not in named):
                    continue
            out.append(m)
        return out

    def _split_multi(self, clause: str) -> list[str]:
        """Cut a clause about several anatomies into parts that each carry their own statement."""
        pieces = [p for p in _SPLIT_RE.split(clause) if p and p.strip(" ,")]
        if len(pieces) < 2:
            return [clause]
        infos = [(p, self._analyze(p)) for p in pieces]
        groups: list[list] = []         # [texts, has_anatomy, has_pred]
        cur = None
        for text, a in infos:
            has_anat = bool(a.anats)
            if cur is None:
                cur = [[text], has_anat, a.pred]
                continue
            if has_anat and cur[1] and cur[2]:
                groups.append(cur)
                cur = [[text], has_anat, a.pred]
            else:
                cur[0].append(text)
                cur[1] = cur[1] or has_anat
                cur[2] = cur[2] or a.pred
        groups.append(cur)
        # a trailing list of organs without its own statement belongs to the previous part
        while len(groups) > 1 and not groups[-1][2]:
            last = groups.pop()
            groups[-1][0].extend(last[0])
        if len(groups) < 2 or any(not g[1] for g in groups):
            return [clause]
        return [_join(g[0]) for g in groups]

    # ------------------------------------------------------------------ reports
    def clauses(self, text: str, section: str = "findings") -> list[ClauseResult]:
        """Analyse one section's text into clause results."""
        out = []
        for sent in self.splitter.sentences(text):
            prev: frozenset = frozenset()
            for cl in self.splitter.clauses(sent):
                a = self._analyze(cl, prev)
                parts = [(cl, a)]
                if len(a.assign) >= 2:
                    texts = self._split_multi(cl)
                    if len(texts) > 1:
                        parts = []
                        p_prev = prev
                        for t in texts:
                            pa = self._analyze(t, p_prev)
                            parts.append((t, pa))
                            p_prev = frozenset(pa.assign)
                for t, pa in parts:
                    assign = [x for x in self.anatomy_ids if x in pa.assign]
                    status = {x: (ABNORMAL if x in pa.abnormal else NORMAL) for x in assign}
                    out.append(ClauseResult(section, sent, t, assign, status, pa.mentions))
                    prev = frozenset(pa.assign)
        return out

    def label(self, findings: str | None = None, impressions: str | None = None,
              text: str | None = None) -> LabelResult:
        """Label one report given as separate ``findings``/``impressions`` fields and/or free ``text``.

        Free text is split into sections by its headers; with no header it counts as findings.
        """
        sections: list[Section] = []
        if findings and str(findings).strip():
            sections.append(Section("findings", "", self._cap(str(findings), "findings")))
        if impressions and str(impressions).strip():
            sections.append(Section("impression", "", self._cap(str(impressions), "impressions")))
        if text and str(text).strip():
            sections.extend(split_sections(self._cap(str(text), "text")))
        clauses: list[ClauseResult] = []
        other: list[str] = []
        for sec in sections:
            if sec.kind in LABELLED:
                clauses.extend(self.clauses(sec.text, sec.kind))
            else:
                other.extend(self.splitter.sentences(sec.text))
        return self._aggregate(clauses, other)

    def _cap(self, text: str, field_name: str) -> str:
        """``text`` cut to ``max_chars`` at a word boundary, with a warning when cut."""
        if not self.max_chars or len(text) <= self.max_chars:
            return text
        cut = text.rfind(" ", 0, self.max_chars + 1)
        cut = cut if cut > self.max_chars // 2 else self.max_chars
        log.warning("report %s truncated from %d to %d characters (labeler max_chars=%d)",
                    field_name, len(text), cut, self.max_chars)
        return text[:cut]

    def _aggregate(self, clauses: list[ClauseResult], other: list[str]) -> LabelResult:
        per_section: dict[str, dict[str, int]] = {}
        for c in clauses:
            lab = per_section.setdefault(c.section, {})
            for m in c.mentions:
                lab[m.diagnosis] = _combine(lab.get(m.diagnosis), m.value)
        labels = {d.id: 0 for d in self.taxonomy.diagnoses}
        if self.disagreement == "impression_wins" and "impression" in per_section:
            imp = per_section["impression"]
            for did, v in per_section.get("findings", {}).items():
                labels[did] = v
            for did, v in imp.items():
                labels[did] = v
        else:
            for lab in per_section.values():
                for did, v in lab.items():
                    labels[did] = _combine(labels[did] if labels[did] != 0 else None, v)
        if self.uncertain != "keep":
            rep = 1 if self.uncertain == "positive" else 0
            labels = {k: (rep if v == -1 else v) for k, v in labels.items()}
        anatomies = {a: AnatomyText() for a in self.anatomy_ids}
        global_sentences: list[str] = []
        for c in clauses:
            if not c.anatomies:
                if c.text not in global_sentences:
                    global_sentences.append(c.text)
                continue
            for a in c.anatomies:
                at = anatomies[a]
                if c.text not in at.sentences:
                    at.sentences.append(c.text)
                if c.status[a] == ABNORMAL or at.status == ABNORMAL:
                    at.status = ABNORMAL
                else:
                    at.status = NORMAL
        return LabelResult(labels, anatomies, global_sentences, other, clauses, self.taxonomy, per_section)


def _combine(old: int | None, new: int) -> int:
    """1 beats -1 beats 0."""
    if old is None:
        return new
    if old == 1 or new == 1:
        return 1
    if old == -1 or new == -1:
        return -1
    return 0


def _join(parts: list[str]) -> str:
    out = ""
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if not out:
            out = p
        elif p.split(" ", 1)[0].lower() in _SPLIT_WORDS:
            out += " " + p
        else:
            out += ", " + p
    return out.strip(" ,")
