"""Diagnosis taxonomies (``configs/diagnoses/*.yaml``): which findings exist, where they live,
how reports name them and how zero-shot prompts phrase them.

The file format (``fvlm-taxonomy``, version 1) is described in docs/FORMATS.md, section
"Taxonomy and report labels". The zero-shot suite, the training code and the report
labeler (``preprocess.reports``) all read taxonomies through :func:`load_taxonomy`::

    tax = load_taxonomy("fvlm54")          # or "ctrate18", or a path to a YAML file
    tax.anatomies                          # [Anatomy(id, name, classes), ...] in anatomy-set order
    tax.diagnoses                          # [Diagnosis(id, name, anatomy, synonyms, ...), ...]
    tax.by_anatomy()                       # {"lung": [Diagnosis, ...], ..., "global": [...]}
    tax.diagnosis("Lung nodule")           # by id, name or CT-RATE column

The label helpers at the bottom (:func:`label_target`, :func:`anatomy_is_normal`) turn the
labeler's three-valued outputs into training/evaluation targets under a configured policy.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


from .config import safe_yaml  # size and alias-expansion caps of untrusted YAML
from .errors import FormatError, FvlmError, check_format
from .resources import config_path

__all__ = ["Anatomy", "Diagnosis", "Taxonomy", "load_taxonomy", "GLOBAL", "FORMAT", "VERSION",
           "UNCERTAIN_POLICIES", "NOT_MENTIONED_POLICIES", "label_target", "anatomy_is_normal",
           "ABNORMAL", "NORMAL", "NOT_MENTIONED", "STATUSES", "STATUS_NOT_MENTIONED", "STATUS_NORMAL",
           "STATUS_ABNORMAL", "STATUS_CODES"]

FORMAT = "fvlm-taxonomy"
VERSION = 1
#: the pseudo-anatomy of whole-scan diagnoses (no organ mask)
GLOBAL = "global"

#: anatomy statuses of the report labeler (``anatomy_text[a]["status"]`` in shards, FORMATS.md)
ABNORMAL, NORMAL, NOT_MENTIONED = "abnormal", "normal", "not_mentioned"
STATUSES = (ABNORMAL, NORMAL, NOT_MENTIONED)
#: the same statuses as integer codes carried in batches (``batch["status"]``)
STATUS_NOT_MENTIONED, STATUS_NORMAL, STATUS_ABNORMAL = 0, 1, 2
STATUS_CODES = {NOT_MENTIONED: STATUS_NOT_MENTIONED, NORMAL: STATUS_NORMAL, ABNORMAL: STATUS_ABNORMAL}

_LIST_FIELDS = ("synonyms", "context_synonyms", "context_terms", "negation", "uncertainty", "exclude",
                "yields_to", "prompts_positive", "prompts_negative", "source")


@dataclass(frozen=True)
class Anatomy:
    """One anatomy: its id, a display name and its TotalSegmentator class names (may be empty
    when the anatomy set file could not be read)."""
    id: str
    name: str
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Diagnosis:
    """One diagnosis of a taxonomy (see docs/FORMATS.md for the meaning of each field)."""
    id: str
    name: str
    anatomy: str                                  # anatomy id, or "global" for whole-scan findings
    synonyms: tuple[str, ...] = ()
    context_synonyms: tuple[str, ...] = ()
    context_terms: tuple[str, ...] = ()
    context_default: bool = False
    negation: tuple[str, ...] = ()
    uncertainty: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    yields_to: tuple[str, ...] = ()               # diagnosis ids whose affirmed mention in the clause drops a context mention
    prompts_positive: tuple[str, ...] = ()
    prompts_negative: tuple[str, ...] = ()
    ctrate: str | None = None                     # CT-RATE label column, if the diagnosis is one
    source: tuple[str, ...] = ()

    @property
    def is_global(self) -> bool:
        return self.anatomy == GLOBAL

    @classmethod
    def of(cls, d: Diagnosis | Mapping) -> Diagnosis:
        """``d`` itself, or the diagnosis a plain mapping with the same keys describes (synthetic
        sources and tests hand those to the evaluation code): ``name`` defaults to the id,
        ``anatomy`` to ``"global"``, lists become tuples, other keys are ignored."""
        if isinstance(d, cls):
            return d
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names and v is not None}
        return cls(**{**kw, "name": kw.get("name") or kw["id"], "anatomy": kw.get("anatomy") or GLOBAL})


@dataclass
class Taxonomy:
    """A loaded taxonomy. ``cues`` and ``lexicon`` are the raw mappings the report labeler uses."""
    name: str
    anatomy_set: str
    anatomies: list[Anatomy]
    diagnoses: list[Diagnosis]
    description: str = ""
    path: str | None = None
    cues: dict = field(default_factory=dict)
    lexicon: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index: dict[str, Diagnosis] = {}
        for d in self.diagnoses:
            for key in (d.id, d.name, d.ctrate):
                if key:
                    self._index.setdefault(key, d)
                    self._index.setdefault(key.lower(), d)

    @property
    def anatomy_ids(self) -> list[str]:
        return [a.id for a in self.anatomies]

    def diagnosis(self, key: str) -> Diagnosis:
        """A diagnosis by id, name or CT-RATE column name (case-insensitive)."""
        d = self._index.get(key) or self._index.get(str(key).lower())
        if d is None:
            raise FvlmError(f"taxonomy '{self.name}' has no diagnosis '{key}'")
        return d

    def by_anatomy(self) -> dict[str, list[Diagnosis]]:
        """Diagnoses grouped by anatomy id, in anatomy order, ``"global"`` last (always present)."""
        out: dict[str, list[Diagnosis]] = {a.id: [] for a in self.anatomies}
        out[GLOBAL] = []
        for d in self.diagnoses:
            out.setdefault(d.anatomy, []).append(d)
        return out

    def names(self) -> list[str]:
        return [d.name for d in self.diagnoses]

    @classmethod
    def of(cls, t: Taxonomy | Mapping) -> Taxonomy:
        """``t`` itself, or a taxonomy from a plain ``{"name": ..., "diagnoses": [mapping, ...]}`` or
        another object with those two attributes (no anatomies: only what the evaluation code reads)."""
        if isinstance(t, cls):
            return t
        name, diagnoses = (t.get("name"), t.get("diagnoses")) if isinstance(t, Mapping) else (t.name, t.diagnoses)
        return cls(name=name or "", anatomy_set="", anatomies=[], diagnoses=[Diagnosis.of(d) for d in diagnoses or ()])


# --------------------------------------------------------------------------- loading


def _resolve(name_or_path: str | os.PathLike, folder: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    try:
        return config_path(f"{folder}/{name_or_path}")
    except FvlmError:
        pass
    try:
        return config_path(name_or_path)
    except FvlmError:
        raise FvlmError(f"taxonomy not found: {name_or_path} (give fvlm54, ctrate18 or a YAML path)") from None


def _read(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    data = safe_yaml(text, path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a YAML mapping")
    return data


def _sub_file(ref, base: Path, fmt: str, version: int) -> dict:
    """A mapping given inline or as a reference to another YAML file (relative to ``base`` or configs/)."""
    if ref is None:
        return {}
    if isinstance(ref, dict):
        return ref
    cand = base.parent / str(ref)
    p = cand if cand.is_file() else config_path(str(ref))
    data = _read(p)
    check_format(data, fmt, version, p)
    return data


def _load_anatomy_set(name: str) -> list[Anatomy]:
    """Anatomies of an anatomy set, through fvlm.anatomy when it is available."""
    try:
        from .anatomy import load_anatomy_set  # written by the preprocess issue
        aset = load_anatomy_set(name)
        out = []
        for a in aset.anatomies:
            out.append(Anatomy(id=a.id, name=getattr(a, "name", a.id) or a.id,
                               classes=tuple(getattr(a, "classes", ()) or ())))
        return out
    except ImportError:
        pass
    p = _resolve(name, "anatomy")
    data = _read(p)
    if data.get("format") != "fvlm-anatomy":
        raise FormatError(f"{p}: format is {data.get('format')!r}, expected 'fvlm-anatomy'")
    return [Anatomy(id=a["id"], name=a.get("name", a["id"]), classes=tuple(a.get("classes", ())))
            for a in data.get("anatomies", [])]


def _as_tuple(v, key: str, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, (list, tuple)):
        raise FormatError(f"{where}: '{key}' must be a list of strings")
    _strings(v, key, where)
    return tuple(v)


def _strings(items, key: str, where: str) -> None:
    """YAML reads bare no/yes/on/off as booleans: demand strings so a cue is never lost."""
    for x in items:
        if not isinstance(x, str):
            raise FormatError(f"{where}: '{key}' holds {x!r} ({type(x).__name__}); quote it "
                              f"(YAML reads bare no/yes/on/off as booleans)")


def _diagnosis(raw: dict, where: str, anatomy_ids: set[str]) -> Diagnosis:
    for req in ("id", "name", "anatomy"):
        if not raw.get(req):
            raise FormatError(f"{where}: diagnosis {raw.get('id', '?')!r} has no '{req}'")
    known = {f.name for f in dataclasses.fields(Diagnosis)} | {"from"}
    unknown = set(raw) - known
    if unknown:
        raise FormatError(f"{where}: diagnosis '{raw['id']}' has unknown keys {sorted(unknown)}")
    if raw["anatomy"] != GLOBAL and raw["anatomy"] not in anatomy_ids:
        raise FormatError(f"{where}: diagnosis '{raw['id']}' names anatomy '{raw['anatomy']}', "
                          f"not in the anatomy set ({', '.join(sorted(anatomy_ids))} or global)")
    kw = {k: _as_tuple(raw.get(k), k, where) for k in _LIST_FIELDS}
    return Diagnosis(id=str(raw["id"]), name=str(raw["name"]), anatomy=str(raw["anatomy"]),
                     context_default=bool(raw.get("context_default", False)),
                     ctrate=raw.get("ctrate"), **kw)


def _merged_raws(data: dict, path: Path, depth: int = 0) -> list[dict]:
    """The raw diagnosis mappings of a taxonomy, ``from:`` entries merged with the ``inherit``
    taxonomy's (itself resolved the same way: ctrate16 -> ctrate18 -> fvlm54)."""
    where = str(path)
    if depth > 8:
        raise FormatError(f"{where}: 'inherit' chain is too deep (a cycle?)")
    parent: dict[str, dict] = {}
    if data.get("inherit"):
        ppath = _resolve(data["inherit"], "diagnoses")
        pdata = _read(ppath)
        check_format(pdata, FORMAT, VERSION, ppath)
        parent = {d["id"]: d for d in _merged_raws(pdata, ppath, depth + 1) if isinstance(d, dict) and "id" in d}
    out = []
    for raw in data.get("diagnoses") or []:
        if not isinstance(raw, dict):
            raise FormatError(f"{where}: each diagnosis must be a mapping, got {raw!r}")
        if "from" in raw:
            if raw["from"] not in parent:
                raise FormatError(f"{where}: diagnosis {raw.get('id')!r} inherits from unknown "
                                  f"'{raw['from']}' (inherit: {data.get('inherit')!r})")
            merged = copy.deepcopy(parent[raw["from"]])
            merged.pop("from", None)
            merged.update(raw)
            raw = merged
        out.append(raw)
    return out


def load_taxonomy(name_or_path: str | os.PathLike) -> Taxonomy:
    """Load a taxonomy by name (``"fvlm54"``, ``"ctrate18"`` under ``configs/diagnoses/``) or path.

    Raises:
        FormatError: wrong ``format``/``version``, unknown keys, duplicate ids/names, an
            anatomy outside the anatomy set.
        FvlmError: the file does not exist.
    """
    if isinstance(name_or_path, Taxonomy):
        return name_or_path
    path = _resolve(name_or_path, "diagnoses")
    data = _read(path)
    check_format(data, FORMAT, VERSION, path)
    where = str(path)
    aset = data.get("anatomy_set") or "fvlm15"
    anatomies = _load_anatomy_set(aset)
    anatomy_ids = {a.id for a in anatomies}
    raws = data.get("diagnoses")
    if not isinstance(raws, list) or not raws:
        raise FormatError(f"{where}: 'diagnoses' must be a non-empty list")
    diagnoses = [_diagnosis(raw, where, anatomy_ids) for raw in _merged_raws(data, path)]
    ids = {d.id for d in diagnoses}
    for d in diagnoses:
        bad = [y for y in d.yields_to if y not in ids]
        if bad:
            raise FormatError(f"{where}: diagnosis '{d.id}' yields_to unknown diagnosis ids {bad}")
    for attr in ("id", "name"):
        seen: set[str] = set()
        for d in diagnoses:
            v = getattr(d, attr)
            if v in seen:
                raise FormatError(f"{where}: duplicate diagnosis {attr} '{v}'")
            seen.add(v)
    cues = _sub_file(data.get("cues"), path, "fvlm-report-cues", 1)
    for k, v in cues.items():
        if isinstance(v, list):
            _strings(v, f"cues.{k}", where)
    lexicon = _sub_file(data.get("lexicon"), path, "fvlm-lexicon", 1)
    terms = lexicon.get("terms", {}) if lexicon else {}
    if not isinstance(terms, dict):
        raise FormatError(f"{where}: lexicon 'terms' must map anatomy ids to lists of words")
    for k, v in terms.items():
        if k != "_none" and k not in anatomy_ids:
            raise FormatError(f"{where}: lexicon names anatomy '{k}', not in the anatomy set {aset}")
        _strings(v or [], f"lexicon.terms.{k}", where)
    return Taxonomy(name=str(data.get("name") or path.stem), anatomy_set=str(aset), anatomies=anatomies,
                    diagnoses=diagnoses, description=str(data.get("description", "")), path=str(path),
                    cues=cues, lexicon=lexicon)


# --------------------------------------------------------------------------- label policies

#: how a -1 (uncertain) label becomes a target: keep -1, count as 1, count as 0, or drop (None)
UNCERTAIN_POLICIES = ("keep", "positive", "negative", "ignore")
#: how a "not_mentioned" anatomy is treated: as normal (fVLM's choice), or as unknown (None)
NOT_MENTIONED_POLICIES = ("normal", "unknown")


def label_target(value: int, uncertain: str = "ignore") -> int | None:
    """Map a labeler value (1, 0, -1) to a training/evaluation target under a policy.

    ``uncertain``: ``keep`` (-1 stays), ``positive`` (-1 -> 1), ``negative`` (-1 -> 0),
    ``ignore`` (-1 -> None: leave the item out of the loss or metric).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise FvlmError(f"uncertain-label policy must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")
    if value != -1:
        return int(value)
    return {"keep": -1, "positive": 1, "negative": 0, "ignore": None}[uncertain]


def anatomy_is_normal(status: str, not_mentioned: str = "normal") -> bool | None:
    """True/False for an anatomy status, None when unknown under the ``not_mentioned`` policy."""
    if not_mentioned not in NOT_MENTIONED_POLICIES:
        raise FvlmError(f"not-mentioned policy must be one of {', '.join(NOT_MENTIONED_POLICIES)}, "
                        f"got {not_mentioned!r}")
    if status == ABNORMAL:
        return False
    if status == NORMAL:
        return True
    if status == NOT_MENTIONED:
        return True if not_mentioned == "normal" else None
    raise FvlmError(f"unknown anatomy status {status!r} ({', '.join(STATUSES)})")
