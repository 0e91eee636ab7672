"""Which cases play which role: test, threshold tuning, probe training.

Rules enforced here (and stated in ``results.json["protocol"]``):

- thresholds are tuned on cases outside the test split, and no patient of the
  tuning set appears in the test set (overlapping patients are dropped from tuning);
- with ``thresholds.source = train_subset`` (CT-RATE's default, whose published
  numbers are on its validation set) a seeded, patient-disjoint fraction of the train
  split's patients is carved out for tuning and excluded from probe training;
- with no tuning cases, thresholded metrics are not reported (threshold-free only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import FvlmError
from ..splits import same_split


@dataclass
class CaseInfo:
    case_id: str
    patient_id: str
    split: str


@dataclass
class Protocol:
    test: list[str]
    tune: list[str]
    train: list[str]
    statement: str
    threshold_source: str            # "split:<name>", "train_subset", "none"
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"statement": self.statement, "threshold_source": self.threshold_source,
                "n_cases": {"test": len(self.test), "threshold_tuning": len(self.tune),
                            "probe_train": len(self.train)},
                "notes": self.notes}


def carve_patients(patients: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded draw of ``round(fraction * n)`` (at least 1) distinct patients."""
    uniq = sorted(set(map(str, patients)))
    if not uniq:
        return set()
    k = min(len(uniq) - 1, max(1, int(round(fraction * len(uniq))))) if len(uniq) > 1 else 1
    rng = np.random.default_rng(seed)
    return {uniq[i] for i in rng.choice(len(uniq), size=k, replace=False)}


def resolve(cases: Sequence[CaseInfo], test_split: str, threshold_split: str, train_split: str,
            source: str, fraction: float = 0.2, seed: int = 0) -> Protocol:
    """Assign cases to test / threshold tuning / probe training."""
    splits = sorted({c.split for c in cases})
    test = [c for c in cases if same_split(c.split, test_split)]
    if not test:
        raise FvlmError(f"no cases in the test split '{test_split}' (the data has splits: "
                        f"{', '.join(splits) or 'none'}); set splits.test")
    test_patients = {c.patient_id for c in test}
    train = [c for c in cases if same_split(c.split, train_split) and not same_split(c.split, test_split)]
    notes = []
    leak = {c.patient_id for c in train} & test_patients
    if leak:
        notes.append(f"{len(leak)} patient(s) of the train split also have test scans; "
                     "their train scans are excluded from threshold tuning and probe training")
        train = [c for c in train if c.patient_id not in leak]
    tune: list[CaseInfo] = []
    if source == "split":
        if same_split(threshold_split, test_split):
            raise FvlmError("thresholds would be tuned on the test split; choose another splits.threshold "
                            "or thresholds.source=train_subset")
        tune = [c for c in cases if same_split(c.split, threshold_split)]
        overlap = {c.patient_id for c in tune} & test_patients
        if overlap:
            notes.append(f"{len(overlap)} patient(s) of split '{threshold_split}' also have test scans; "
                         "dropped from threshold tuning")
            tune = [c for c in tune if c.patient_id not in overlap]
        tuned = {c.case_id for c in tune}
        train = [c for c in train if c.case_id not in tuned]
        if tune:
            tsrc = f"split:{threshold_split}"
            statement = (f"Metrics on split '{test_split}' ({len(test)} scans, {len(test_patients)} patients). "
                         f"Operating thresholds tuned on split '{threshold_split}' ({len(tune)} scans), "
                         "never on the test split.")
        else:
            tsrc = "none"
            statement = (f"Metrics on split '{test_split}' ({len(test)} scans, {len(test_patients)} patients). "
                         f"No validation split '{threshold_split}' exists, so only threshold-free metrics "
                         "(AUC) are reported; thresholded metrics are omitted rather than tuned on test data.")
    elif source == "train_subset":
        chosen = carve_patients([c.patient_id for c in train], fraction, seed)
        tune = [c for c in train if c.patient_id in chosen]
        train = [c for c in train if c.patient_id not in chosen]
        if tune:
            tsrc = "train_subset"
            statement = (f"Metrics on split '{test_split}' ({len(test)} scans, {len(test_patients)} patients). "
                         f"Operating thresholds tuned on a patient-disjoint subset of split '{train_split}' "
                         f"({len(chosen)} patients = {fraction:.0%} drawn with seed {seed}, {len(tune)} scans), "
                         "never on the test split; the linear probe is trained on the rest of that split.")
        else:
            tsrc = "none"
            statement = (f"Metrics on split '{test_split}' ({len(test)} scans). No train split "
                         f"'{train_split}' to carve a threshold-tuning subset from, so only threshold-free "
                         "metrics (AUC) are reported.")
    elif source == "none":
        tsrc = "none"
        statement = (f"Metrics on split '{test_split}' ({len(test)} scans, {len(test_patients)} patients). "
                     "Thresholds disabled by configuration: threshold-free metrics (AUC) only.")
    else:
        raise FvlmError(f"unknown thresholds.source {source!r} (split, train_subset, none)")
    return Protocol([c.case_id for c in test], [c.case_id for c in tune], [c.case_id for c in train],
                    statement, tsrc, notes)
