"""Radiology reports written from the demo ground truth, with varied phrasing.

A report has a findings and an impression section. For each anatomy in view it states
every inserted finding (with measurements, side and lobe), and otherwise, at random,
a normal sentence ("The liver is unremarkable."), specific negations ("No pleural
effusion."), both, or nothing (the anatomy is omitted). Sentences come with the
diagnoses they assert or deny (:class:`Statement`), so tests can check every sentence
against the ground truth without a report labeler.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: anatomies described, in report order, per source region
ANATOMY_ORDER = {
    "chest": ["lung", "heart", "aorta"],
    "abdomen": ["lung", "liver", "gallbladder", "spleen", "kidney", "aorta"],
}

#: diagnoses the generator can insert, per anatomy
DIAGNOSES = {
    "lung": ["lung_nodule", "consolidation", "pleural_effusion", "emphysema"],
    "heart": ["cardiomegaly", "pericardial_effusion"],
    "aorta": ["arterial_wall_calcification", "aortic_aneurysm"],
    "liver": ["hepatic_steatosis", "hepatic_cyst", "liver_mass"],
    "gallbladder": ["gallstones"],
    "spleen": ["splenomegaly"],
    "kidney": ["renal_cyst", "nephrolithiasis"],
}

NORMAL = {
    "lung": {"chest": ["The lungs are clear.", "Both lungs are clear.",
                       "The lung parenchyma is unremarkable."],
             "abdomen": ["The lung bases are clear.", "The visualized lung bases are unremarkable.",
                         "Clear lung bases."]},
    "heart": ["The heart is unremarkable.", "Normal heart size without pericardial effusion."],
    "aorta": {"chest": ["The thoracic aorta is unremarkable.", "The thoracic aorta is normal in caliber without calcification."],
              "abdomen": ["The abdominal aorta is unremarkable.", "Normal caliber abdominal aorta without calcification."]},
    "liver": ["The liver is unremarkable.", "The liver is normal in size and attenuation without focal lesion.",
              "Unremarkable liver."],
    "gallbladder": ["The gallbladder is unremarkable.", "Normal gallbladder."],
    "spleen": ["The spleen is unremarkable.", "The spleen is normal."],
    "kidney": ["The kidneys are unremarkable.", "Both kidneys are normal.", "Unremarkable kidneys."],
}

#: negation sentences -> the diagnoses each one denies
NEGATIONS = {
    "lung_nodule": ["No pulmonary nodule.", "No suspicious pulmonary nodules are seen."],
    "consolidation": ["No consolidation.", "No focal consolidation."],
    "pleural_effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "emphysema": ["No emphysema.", "No emphysematous changes."],
    "cardiomegaly": ["Heart size is normal.", "No cardiomegaly."],
    "pericardial_effusion": ["No pericardial effusion."],
    "arterial_wall_calcification": ["No vascular calcification.", "No significant atherosclerosis."],
    "aortic_aneurysm": ["No aortic aneurysm.", "Aortic caliber is normal."],
    "hepatic_steatosis": ["No hepatic steatosis.", "Normal liver attenuation."],
    "hepatic_cyst": ["No hepatic cyst.", "No cystic liver lesion."],
    "liver_mass": ["No hepatic mass.", "No solid liver lesion."],
    "gallstones": ["No gallstones.", "No cholelithiasis."],
    "splenomegaly": ["No splenomegaly.", "The spleen is normal in size."],
    "renal_cyst": ["No renal cyst."],
    "nephrolithiasis": ["No renal calculi.", "No nephrolithiasis."],
}
#: sentences that deny several diagnoses at once
JOINT_NEGATIONS = [
    (("hepatic_cyst", "liver_mass"), ["No focal liver lesion."]),
    (("renal_cyst", "nephrolithiasis"), ["No renal stones or cysts."]),
    (("pleural_effusion", "consolidation"), ["No pleural effusion or consolidation."]),
    (("cardiomegaly", "pericardial_effusion"), ["Normal heart size, no pericardial effusion."]),
]


@dataclass
class Statement:
    """One sentence: the diagnoses it asserts (``positive``) or denies; ``()`` for a normal
    sentence, which denies every diagnosis of its ``anatomy``."""

    text: str
    section: str            # "findings" or "impressions"
    anatomy: str
    diagnoses: tuple
    positive: bool


@dataclass
class Report:
    findings: str
    impressions: str
    statements: list


def _cm(mm: float) -> str:
    return f"{mm / 10:.1f} cm"


def _severity(x: float, cuts: tuple, words=("small", "moderate", "large")) -> str:
    return words[0] if x < cuts[0] else words[1] if x < cuts[1] else words[2]


def _count_word(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))


def positive_sentence(rec: dict, pick) -> tuple[str, str]:
    """(findings sentence, impression phrase) for one ground-truth record."""
    f = rec["finding"]
    size = rec.get("size_mm")
    mm = f"{size:.0f} mm" if size else ""
    out = (_chest_sentence(f, rec, pick, size, mm, rec.get("side"))
           or _abdomen_sentence(f, rec, pick, size, mm, rec.get("side")))
    if out is None:
        raise KeyError(f"no report template for finding {f!r}")
    return out


def _chest_sentence(f: str, rec: dict, pick, size, mm: str, side) -> tuple[str, str] | None:
    """:func:`positive_sentence` of a chest finding (lungs, heart, aorta), else None."""
    if f == "lung_nodule":
        where = f"{side} {rec['lobe']} lobe"
        return pick([f"A {mm} solid nodule in the {where}.",
                     f"There is a {mm} pulmonary nodule in the {where}.",
                     f"{where.capitalize()} nodule measuring {mm}."]), \
            f"{mm} {where} pulmonary nodule; follow-up CT recommended."
    if f == "consolidation":
        where = f"{side} {rec['lobe']} lobe"
        return pick([f"Consolidation in the {where}, about {_cm(size)}.",
                     f"Airspace consolidation in the {where}, compatible with pneumonia.",
                     f"Dense consolidation of the {where} measuring {_cm(size)}."]), \
            f"{where.capitalize()} consolidation, likely pneumonia."
    if f == "pleural_effusion":
        sev = _severity(size, (15, 25))
        if side == "bilateral":
            s = pick([f"{sev.capitalize()} bilateral pleural effusions.",
                      f"Bilateral {sev} pleural effusions, up to {mm} thick."])
            return s, "Bilateral pleural effusions."
        return pick([f"{sev.capitalize()} {side} pleural effusion.",
                     f"There is a {sev} {side} pleural effusion measuring up to {mm}.",
                     f"{side.capitalize()}-sided pleural effusion, {mm} in depth."]), \
            f"{sev.capitalize()} {side} pleural effusion."
    if f == "emphysema":
        sev = _severity(rec["extent_pct"], (25, 35), ("mild", "moderate", "severe"))
        return pick([f"{sev.capitalize()} {rec['pattern']} emphysema.",
                     f"Emphysematous changes of {sev} extent.",
                     f"There is {sev} emphysema."]), f"{sev.capitalize()} emphysema."
    if f == "cardiomegaly":
        return pick([f"The heart is enlarged (transverse diameter {_cm(size)}).",
                     "Cardiomegaly.", f"Enlarged cardiac silhouette, {_cm(size)} wide."]), "Cardiomegaly."
    if f == "pericardial_effusion":
        sev = _severity(size, (10, 16))
        return pick([f"{sev.capitalize()} pericardial effusion measuring up to {mm}.",
                     f"There is a {sev} circumferential pericardial effusion.",
                     f"Pericardial fluid, {mm} thick."]), f"{sev.capitalize()} pericardial effusion."
    if f == "arterial_wall_calcification":
        seg = rec["segment"]
        return pick([f"Calcified atherosclerotic plaques along the {seg} aorta.",
                     f"Extensive atherosclerotic calcification of the {seg} aorta.",
                     f"Scattered calcified atheroma plaques in the {seg} aorta."]), \
            "Aortic atherosclerosis."
    if f == "aortic_aneurysm":
        seg = rec["segment"]
        if seg == "ascending":
            return pick([f"The ascending aorta is dilated to {mm}, consistent with aneurysm.",
                         f"Aneurysmal dilatation of the ascending aorta, {_cm(size)}."]), \
                f"Ascending aortic aneurysm ({mm})."
        return pick([f"Infrarenal abdominal aortic aneurysm measuring {mm}.",
                     f"Fusiform aneurysmal dilatation of the infrarenal aorta up to {_cm(size)}."]), \
            f"Abdominal aortic aneurysm, {_cm(size)}."
    return None


def _abdomen_sentence(f: str, rec: dict, pick, size, mm: str, side) -> tuple[str, str] | None:
    """:func:`positive_sentence` of an abdominal finding (liver, kidneys, spleen, gallbladder), else None."""
    if f == "hepatic_steatosis":
        sp = rec.get("spleen_hu")
        ref = f", spleen {sp} HU" if sp is not None else ""
        return pick([f"Diffusely decreased liver attenuation ({rec['liver_hu']} HU{ref}), consistent with hepatic steatosis.",
                     "Fatty infiltration of the liver.",
                     "The liver is hypoattenuating, compatible with hepatic steatosis."]), "Hepatic steatosis."
    if f == "hepatic_cyst":
        n = rec.get("count", 1)
        lobe = rec["lobe"]
        if n > 1:
            return pick([f"{_count_word(n).capitalize()} simple hepatic cysts, the largest {mm}, in the {lobe} lobe.",
                         f"Multiple hepatic cysts up to {mm}."]), "Hepatic cysts."
        return pick([f"A {mm} hypodense cystic lesion in the {lobe} hepatic lobe, compatible with a simple cyst.",
                     f"Simple liver cyst in the {lobe} lobe measuring {mm}."]), "Simple hepatic cyst."
    if f == "liver_mass":
        lobe = rec["lobe"]
        return pick([f"A {mm} heterogeneous hypoattenuating mass in the {lobe} lobe of the liver.",
                     f"Ill-defined hepatic mass in the {lobe} lobe measuring {_cm(size)}, suspicious for metastasis."]), \
            f"{_cm(size)} liver mass, further workup recommended."
    if f == "renal_cyst":
        return pick([f"A {mm} simple cyst in the {side} kidney.",
                     f"{side.capitalize()} renal cortical cyst, {mm}, Bosniak I."]), f"{side.capitalize()} renal cyst."
    if f == "nephrolithiasis":
        n = rec.get("count", 1)
        if side == "bilateral":
            return pick([f"Bilateral nephrolithiasis, the largest stone {mm}.",
                         f"Nonobstructing calculi in both kidneys up to {mm}."]), "Bilateral nephrolithiasis."
        if n > 1:
            return pick([f"{_count_word(n).capitalize()} nonobstructing calculi in the {side} kidney, the largest {mm}.",
                         f"Multiple {side} renal stones up to {mm}."]), f"{side.capitalize()} nephrolithiasis."
        return pick([f"A {mm} nonobstructing stone in the {side} kidney.",
                     f"{side.capitalize()} renal calculus measuring {mm}."]), f"{side.capitalize()} nephrolithiasis."
    if f == "splenomegaly":
        return pick([f"Splenomegaly, the spleen measures {_cm(size)}.",
                     f"The spleen is enlarged ({_cm(size)}).", "Enlarged spleen."]), "Splenomegaly."
    if f == "gallstones":
        n = rec.get("count", 1)
        return pick([f"Calcified gallstones, the largest {mm}." if n > 1 else f"A {mm} calcified gallstone.",
                     "Cholelithiasis without gallbladder wall thickening."]), "Cholelithiasis."
    return None


def write_report(region: str, in_view: list[str], records: list[dict], rng: np.random.Generator,
                 p_omit: float = 0.2) -> Report:
    """Write findings and impressions for one case.

    Args:
        region: "chest" or "abdomen" (sets order and wording).
        in_view: fvlm54 anatomy ids whose masks are in the volume.
        records: ground-truth finding records (``findings.py``), each with ``finding``, ``anatomy``.
        p_omit: chance that an anatomy without findings is not mentioned at all.
    """
    def pick(options):
        return options[int(rng.integers(len(options)))]

    statements: list[Statement] = []
    present = {r["finding"] for r in records}
    impression_bits = []
    for anat in ANATOMY_ORDER[region]:
        if anat not in in_view:
            continue
        recs = [r for r in records if r["anatomy"] == anat]
        for r in recs:
            text, imp = positive_sentence(r, pick)
            statements.append(Statement(text, "findings", anat, (r["finding"],), True))
            impression_bits.append((anat, r["finding"], imp))
        absent = [d for d in DIAGNOSES[anat] if d not in present]
        if not recs:
            u = rng.random()
            if u < p_omit:
                continue
            if u < p_omit + (1 - p_omit) * 0.45:
                opts = NORMAL[anat]
                opts = opts[region] if isinstance(opts, dict) else opts
                statements.append(Statement(pick(opts), "findings", anat, (), False))
                continue
        # specific negations for some absent diagnoses (joint sentences when all parts are absent)
        used = set()
        for group, opts in JOINT_NEGATIONS:
            if all(g in absent for g in group) and rng.random() < 0.3:
                statements.append(Statement(pick(opts), "findings", anat, group, False))
                used.update(group)
        for d in absent:
            if d not in used and rng.random() < 0.5:
                statements.append(Statement(pick(NEGATIONS[d]), "findings", anat, (d,), False))
    if impression_bits:
        order = list(range(len(impression_bits)))
        rng.shuffle(order)
        keep = [impression_bits[i] for i in order if rng.random() < 0.85] or [impression_bits[order[0]]]
        for anat, f, imp in keep:
            statements.append(Statement(imp, "impressions", anat, (f,), True))
    else:
        opts = ["No acute abnormality.", "Unremarkable examination.",
                f"No significant abnormality in the {region}."]
        statements.append(Statement(pick(opts), "impressions", "global", (), False))
    findings = " ".join(s.text for s in statements if s.section == "findings")
    if not findings:
        findings = "No abnormality is described."
        statements.insert(0, Statement(findings, "findings", "global", (), False))
    impressions = " ".join(s.text for s in statements if s.section == "impressions")
    return Report(findings, impressions, statements)
