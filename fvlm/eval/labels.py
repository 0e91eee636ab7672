"""Ground truth for the zero-shot suite: label files (CSV/JSONL) or the shards' silver labels.

A label file has one row per case. The case is named by a ``case_id`` column (or
CT-RATE's ``VolumeName``; also ``volume_name``, ``case``, ``id``); names are compared
without directories and without ``.nii.gz`` / ``.nii`` / ``.npz`` / ``.h5`` suffixes,
so CT-RATE's ``valid_1_a_1.nii.gz`` matches the case ``valid_1_a_1``. Every other
column is matched to a diagnosis by its ``id``, ``name`` or ``ctrate`` name
(case-insensitive, spaces/underscores/hyphens alike); columns matching no diagnosis
are reported as ignored. Values: ``1/0``, ``true/false``, ``yes/no``,
``positive/negative``; ``-1``, empty or ``nan`` mean unlabeled.

Labels matrix convention: ``(N, D)`` int8 with 1 positive, 0 negative, -1 unlabeled.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import FvlmError
from ..jsonl import read_jsonl
from ..taxonomy import Taxonomy

CASE_COLUMNS = ("case_id", "volumename", "volume_name", "case", "id")
_SUFFIXES = (".nii.gz", ".nii", ".npz", ".h5", ".mha", ".nrrd")
_TRUE = {"1", "1.0", "true", "yes", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "negative", "neg"}
_MISSING = {"", "-1", "-1.0", "nan", "none", "null", "na", "uncertain"}


def normalize_case_name(name: str) -> str:
    """``/x/valid_1_a_1.nii.gz`` -> ``valid_1_a_1``."""
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    low = base.lower()
    for suf in _SUFFIXES:
        if low.endswith(suf):
            return base[: -len(suf)]
    return base


def _key(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(s).strip().lower())


def _value(v: Any, where: str) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v != v or v == -1:  # nan
            return -1
        if v in (0, 1):
            return int(v)
    s = str(v).strip().lower()
    if s in _TRUE:
        return 1
    if s in _FALSE:
        return 0
    if s in _MISSING:
        return -1
    raise FvlmError(f"{where}: label value {v!r} is not one of 1/0/-1/true/false/empty")


@dataclass
class LabelTable:
    """Labels read from one or more files, keyed by normalised case name."""
    labels: dict[str, dict[str, int]]           # case -> diagnosis id -> 1/0/-1
    columns: dict[str, str]                      # diagnosis id -> column it came from
    ignored_columns: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def matrix(self, case_ids: Sequence[str], diagnoses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(N, D)`` labels for ``case_ids`` and a ``(N,)`` bool "case is in the file"."""
        out = np.full((len(case_ids), len(diagnoses)), -1, dtype=np.int8)
        found = np.zeros(len(case_ids), dtype=bool)
        for i, c in enumerate(case_ids):
            row = self.labels.get(normalize_case_name(c))
            if row is None:
                continue
            found[i] = True
            for j, d in enumerate(diagnoses):
                out[i, j] = row.get(d, -1)
        return out, found


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FvlmError(f"label file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        # {"case_id": .., "labels": {...}} is accepted as well as flat rows
        return [{**{k: v for k, v in obj.items() if k != "labels"}, **obj["labels"]}
                if isinstance(obj.get("labels"), dict) else obj
                for _, obj in read_jsonl(path, objects=True)]
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise FvlmError(f"label file {path} must be .csv, .tsv or .jsonl")


def read_label_files(paths: Sequence[str], taxonomy) -> LabelTable:
    """Read label files and map their columns onto the taxonomy's diagnoses."""
    lookup: dict[str, str] = {}
    for d in Taxonomy.of(taxonomy).diagnoses:
        for alias in (d.id, d.name, d.ctrate):
            if alias:
                lookup.setdefault(_key(alias), d.id)
    table = LabelTable({}, {}, [], [str(p) for p in paths])
    ignored: set[str] = set()
    for p in paths:
        path = Path(p)
        rows = _rows(path)
        if not rows:
            raise FvlmError(f"label file {path} has no rows")
        cols = list(rows[0].keys())
        case_col = next((c for c in cols if _key(c).replace(" ", "_") in CASE_COLUMNS), None)
        if case_col is None:
            raise FvlmError(f"label file {path} needs a case column (one of: case_id, VolumeName); "
                            f"its columns are {', '.join(cols[:8])}")
        mapping: dict[str, str] = {}
        for c in cols:
            if c == case_col:
                continue
            did = lookup.get(_key(c))
            if did is None:
                ignored.add(c)
            else:
                mapping[c] = did
                table.columns.setdefault(did, c)
        for n, row in enumerate(rows, 2):
            name = normalize_case_name(row.get(case_col, ""))
            if not name:
                raise FvlmError(f"{path}: row {n} has an empty {case_col}")
            entry = table.labels.setdefault(name, {})
            for c, did in mapping.items():
                if c in row:
                    v = _value(row[c], f"{path} row {n} column {c!r}")
                    if entry.get(did, -1) != -1 and v != -1 and entry[did] != v:
                        raise FvlmError(f"{path}: case {name} has conflicting labels for {did}")
                    if v != -1 or did not in entry:
                        entry[did] = v
    if not table.columns:
        raise FvlmError(f"no column of {', '.join(map(str, paths))} matches a diagnosis of the taxonomy "
                        "(by id, name or CT-RATE name)")
    table.ignored_columns = sorted(ignored)
    return table


def silver_matrix(records: Sequence[Any], diagnoses: Sequence[str]) -> np.ndarray:
    """``(N, D)`` silver labels from ``CaseRecord.labels`` (missing -> -1)."""
    out = np.full((len(records), len(diagnoses)), -1, dtype=np.int8)
    for i, r in enumerate(records):
        lab = r.labels or {}
        for j, d in enumerate(diagnoses):
            v = lab.get(d, -1)
            out[i, j] = v if v in (0, 1) else -1
    return out
