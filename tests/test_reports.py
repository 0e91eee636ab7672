"""Report labeler, taxonomies and the `fvlm reports` command."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from fvlm.cli import main
from fvlm.errors import FormatError, FvlmError
from fvlm.taxonomy import anatomy_is_normal, label_target, load_taxonomy
from preprocess.reports import ReportLabeler, SentenceSplitter, split_sections
from preprocess.reports.evaluate import format_table, load_fixtures, score_fixtures

FIX = Path(__file__).parent / "fixtures" / "reports"

CTRATE18 = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
            "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
            "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
            "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
            "Interlobular septal thickening"]


@lru_cache(None)
def labeler(name: str = "fvlm54", anatomy_set: str | None = None) -> ReportLabeler:
    return ReportLabeler(name, anatomy_set=anatomy_set)


# --------------------------------------------------------------------------- taxonomies


def test_fvlm54_taxonomy():
    tax = load_taxonomy("fvlm54")
    assert len(tax.diagnoses) == 54
    assert len(tax.anatomies) == 15
    assert [d.id for d in tax.diagnoses if d.anatomy == "global"] == ["medical_material", "lymphadenopathy"]
    groups = tax.by_anatomy()
    assert all(groups[a.id] for a in tax.anatomies), "every anatomy has at least one diagnosis"
    assert tax.anatomies[0].classes, "TotalSegmentator classes come from the anatomy set"
    for d in tax.diagnoses:
        assert d.prompts_positive and d.prompts_negative, d.id
        assert d.synonyms, d.id
    assert tax.diagnosis("Lung nodule").id == "lung_nodule"
    assert tax.diagnosis("lung_nodule").ctrate == "Lung nodule"
    with pytest.raises(FvlmError, match="no diagnosis"):
        tax.diagnosis("unicorn")


def test_ctrate18_taxonomy_names_and_anatomies():
    tax = load_taxonomy("ctrate18")
    assert [d.name for d in tax.diagnoses] == CTRATE18
    assert all(d.ctrate == d.name for d in tax.diagnoses)
    assert {d.name for d in tax.diagnoses if d.anatomy == "global"} == {"Medical material", "Lymphadenopathy"}
    assert {d.anatomy for d in tax.diagnoses} <= {"lung", "heart", "aorta", "esophagus", "global"}
    # inherited synonyms and prompts
    assert "centrilobular emphysema" in tax.diagnosis("Emphysema").synonyms
    assert tax.diagnosis("Emphysema").prompts_negative


def _write(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_taxonomy_format_errors(tmp_path):
    with pytest.raises(FormatError, match="format"):
        load_taxonomy(_write(tmp_path, "format: other\nversion: 1\ndiagnoses: []\n"))
    with pytest.raises(FormatError, match="version"):
        load_taxonomy(_write(tmp_path, "format: fvlm-taxonomy\nversion: 9\ndiagnoses: []\n"))
    base = "format: fvlm-taxonomy\nversion: 1\nanatomy_set: fvlm15\n"
    with pytest.raises(FormatError, match="not in the anatomy set"):
        load_taxonomy(_write(tmp_path, base + "diagnoses:\n  - {id: x, name: X, anatomy: brain}\n"))
    with pytest.raises(FormatError, match="unknown keys"):
        load_taxonomy(_write(tmp_path, base + "diagnoses:\n  - {id: x, name: X, anatomy: lung, synonym: [a]}\n"))
    with pytest.raises(FormatError, match="duplicate"):
        load_taxonomy(_write(tmp_path, base + "diagnoses:\n  - {id: x, name: X, anatomy: lung}\n"
                                              "  - {id: x, name: Y, anatomy: lung}\n"))
    with pytest.raises(FormatError, match="quote it"):
        load_taxonomy(_write(tmp_path, base + "diagnoses:\n  - {id: x, name: X, anatomy: lung, negation: [no]}\n"))
    with pytest.raises(FvlmError, match="not found"):
        load_taxonomy(tmp_path / "missing.yaml")


def test_label_policies():
    assert label_target(-1, "keep") == -1
    assert label_target(-1, "positive") == 1
    assert label_target(-1, "negative") == 0
    assert label_target(-1, "ignore") is None
    assert label_target(1, "ignore") == 1
    assert anatomy_is_normal("not_mentioned", "normal") is True
    assert anatomy_is_normal("not_mentioned", "unknown") is None
    assert anatomy_is_normal("abnormal") is False
    with pytest.raises(FvlmError, match="policy"):
        label_target(-1, "maybe")


# --------------------------------------------------------------------------- splitting


def test_splitting_fixtures():
    sp = SentenceSplitter()
    for case in load_fixtures(FIX / "splitting.yaml")["cases"]:
        got = sp.sentences(case["text"])
        assert got == case["sentences"], case["text"]
        if "clauses" in case:
            assert sp.clauses(got[0]) == case["clauses"]
        # the regex fast path agrees with running Punkt on everything
        assert sp.punkt_sentences(case["text"]) == got


def test_sections():
    secs = split_sections("CLINICAL HISTORY: cough.\nFINDINGS: Lungs clear. IMPRESSION: Normal. Technique: axial.")
    assert [(s.kind, s.text) for s in secs] == [("other", "cough."), ("findings", "Lungs clear."),
                                                ("impression", "Normal."), ("other", "axial.")]
    assert [s.kind for s in split_sections("Lungs clear. Conclusion: normal chest.")] == ["findings", "impression"]
    assert split_sections("") == []


# --------------------------------------------------------------------------- labeling


@pytest.mark.parametrize("text,diag,value", [
    ("No pleural effusion or pneumothorax.", "pleural_effusion", 0),
    ("No pleural effusion, pneumothorax or consolidation.", "consolidation", 0),
    ("The previously described nodule in the right upper lobe is not seen.", "lung_nodule", 0),
    ("Pleural effusion, atelectasis were not observed.", "atelectasis", 0),
    ("Pneumonia cannot be excluded.", "lung_opacity", -1),
    ("Possible small right pleural effusion.", "pleural_effusion", -1),
    ("No pleural effusion. Mild bibasilar atelectasis.", "atelectasis", 1),
    ("No effusion but there is mild atelectasis in the left lower lobe.", "atelectasis", 1),
    ("A 4 mm nodule in the RUL.", "lung_nodule", 1),
    ("A 12 mm nodule in the right thyroid lobe.", "lung_nodule", 0),
    ("Renal cyst.", "hepatic_cyst", 0),
    ("Cysts in the liver and both kidneys.", "hepatic_cyst", 1),
    ("Cysts in the liver and both kidneys.", "renal_cyst", 1),
    ("Subcutaneous emphysema in the chest wall.", "emphysema", 0),
    ("Heart size is normal.", "cardiomegaly", 0),
    ("Aeration and density of both lungs are normal.", "lung_opacity", 0),
])
def test_negation_and_context(text, diag, value):
    assert labeler().label(findings=text).labels[diag] == value


def test_result_structure_and_statuses():
    out = labeler().label(findings="The liver is enlarged, the spleen is normal, and there are stones in the "
                                   "gallbladder. The thyroid is unremarkable.",
                          impressions="Hepatomegaly. Cholelithiasis.")
    assert out.anatomies["liver"].status == "abnormal"
    assert out.anatomies["spleen"].status == "normal"
    assert out.anatomies["kidney"].status == "not_mentioned"
    assert out.anatomies["spleen"].sentences == ["the spleen is normal"]
    assert out.global_sentences == ["The thyroid is unremarkable."]
    j = out.to_json()
    assert set(j) == {"labels", "anatomies", "global_sentences"}
    assert j["labels"]["Hepatomegaly"] == 1 and len(j["labels"]) == 54
    assert j["anatomies"]["gallbladder"] == {"status": "abnormal", "sentences": [
        "and there are stones in the gallbladder.", "Cholelithiasis."]}
    assert set(out.to_json(keys="id")["labels"]) == {d.id for d in labeler().taxonomy.diagnoses}
    exp = out.explain()
    assert exp["labels"] == {"hepatomegaly": 1, "gallstones": 1}
    assert any(m["cue"] is None and m["diagnosis"] == "hepatomegaly" for c in exp["clauses"] for m in c["labels"])


def test_disagreement_rule_and_uncertain_policy():
    f, i = "Small right pleural effusion.", "No pleural effusion."
    assert labeler().label(findings=f, impressions=i).labels["pleural_effusion"] == 1
    lab = ReportLabeler("fvlm54", disagreement="impression_wins")
    assert lab.label(findings=f, impressions=i).labels["pleural_effusion"] == 0
    assert lab.label(findings=f, impressions="Cardiomegaly.").labels["pleural_effusion"] == 1
    pos = ReportLabeler("fvlm54", uncertain="positive")
    assert pos.label(findings="Possible pleural effusion.").labels["pleural_effusion"] == 1
    with pytest.raises(FvlmError):
        ReportLabeler("fvlm54", disagreement="vote")


def test_ctrate4_sends_other_anatomies_to_global():
    out = labeler("ctrate18", "ctrate4").label(findings="The liver is enlarged. Cardiomegaly.")
    assert set(out.anatomies) == {"lung", "heart", "esophagus", "aorta"}
    assert out.global_sentences == ["The liver is enlarged."]
    assert out.labels_by_name()["Cardiomegaly"] == 1


def test_fixture_sentences_and_reports(capsys):
    score = score_fixtures(labeler, sentences=load_fixtures(FIX / "sentences.yaml"),
                           reports=load_fixtures(FIX / "reports.yaml"))
    assert score.items >= 80
    m = score.micro()
    with capsys.disabled():
        print("\nper-label precision/recall on tests/fixtures/reports:\n" + format_table(score))
    assert m.precision >= 0.9 and m.recall >= 0.9, score.failures
    assert score.exact_anatomies / score.anatomy_items >= 0.9, score.failures
    assert score.status_correct / score.status_total >= 0.95, score.failures


# --------------------------------------------------------------------------- CLI


def test_cli_label_jsonl_with_bad_lines(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"\n".join([
        json.dumps({"id": "a", "findings": "Mild cardiomegaly. No pleural effusion.", "impressions": "Cardiomegaly."}).encode(),
        json.dumps({"id": "b", "text": "FINDINGS: Emphysema. IMPRESSION: Emphysema."}).encode(),
        b"{not json",
        json.dumps({"id": "c"}).encode(),
        b'{"id": "d", "text": "caf\xe9"}',
        json.dumps({"id": "e", "findings": 3}).encode(),
        json.dumps([1, 2]).encode(),
    ]) + b"\n")
    out = tmp_path / "o" / "labels.jsonl"
    assert main(["reports", "label", "--in", str(src), "--out", str(out), "--taxonomy", "ctrate18", "-q"]) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 7
    assert rows[0]["id"] == "a" and list(rows[0]["labels"]) == CTRATE18 and rows[0]["labels"]["Cardiomegaly"] == 1
    assert rows[0]["anatomies"]["heart"]["status"] == "abnormal"
    assert rows[1]["labels"]["Emphysema"] == 1
    errs = {r["line"]: r["error"] for r in rows if "error" in r}
    assert "JSON" in errs[3] and "report text" in errs[4] and "UTF-8" in errs[5]
    assert "string" in errs[6] and "object" in errs[7]
    assert (tmp_path / "o" / "labels.jsonl.config.yaml").is_file()


def test_cli_label_ctrate_csv(tmp_path):
    src = tmp_path / "r.csv"
    src.write_bytes(b"VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
                    b'train_1_a_1.nii.gz,cough,CT,"Bilateral pleural effusion, more on the right.",Pleural effusion.\n'
                    b'train_2_a_1.nii.gz,x,y,"bad \xff byte",z\n'
                    b"train_3_a_1.nii.gz,x,y,,\n")
    out = tmp_path / "l.jsonl"
    assert main(["reports", "label", "--in", str(src), "--out", str(out), "--set", "taxonomy=ctrate18", "-q"]) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["id"] == "train_1_a_1.nii.gz" and rows[0]["labels"]["Pleural effusion"] == 1
    assert rows[1]["error"] == "not valid UTF-8" and rows[1]["id"] == "train_2_a_1.nii.gz"
    assert "report text" in rows[2]["error"]


def test_cli_errors(tmp_path, capsys):
    assert main(["reports", "label", "--in", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["reports", "label", "--in", str(tmp_path / "none.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err
    bad = tmp_path / "b.csv"
    bad.write_text("a,b\n1,2\n", encoding="utf-8")
    assert main(["reports", "label", "--in", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "CT-RATE" in capsys.readouterr().err
    assert main(["reports", "explain"]) == 2
    assert main(["reports", "explain", "--text", "x", "--taxonomy", "nope"]) == 2
    assert "taxonomy not found" in capsys.readouterr().err
    assert main(["reports", "explain", "--text", "x", "--set", "uncertain=maybe"]) == 2


def test_cli_explain(capsys):
    assert main(["reports", "explain", "--text",
                 "FINDINGS: No pleural effusion. A 5 mm nodule in the RUL; pneumonia cannot be excluded."]) == 0
    out = capsys.readouterr().out
    assert "Lung nodule =  1" in out and "cue 'cannot be excluded'" in out and "lung=abnormal" in out
    assert main(["reports", "explain", "--json", "--findings", "Cardiomegaly."]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert exp["labels"] == {"cardiomegaly": 1} and exp["anatomies"]["heart"] == "abnormal"


def test_fixture_files_are_valid_yaml():
    for name in ("sentences.yaml", "reports.yaml", "splitting.yaml"):
        data = yaml.safe_load((FIX / name).read_text(encoding="utf-8"))
        assert data["format"] == "fvlm-report-fixtures"
    n = len(load_fixtures(FIX / "sentences.yaml")["sentences"])
    assert n >= 60 and len(load_fixtures(FIX / "reports.yaml")["reports"]) >= 20


# --------------------------------------------------------------------------- CT-RATE conventions (issue 15)


def _pos(name: str, text: str, tax: str = "ctrate18") -> int:
    lab = labeler(tax)
    return lab.label(findings=text).labels[lab.taxonomy.diagnosis(name).id]


@pytest.mark.parametrize("text,ctrate,fvlm", [
    # lymph nodes described with a size or place count for CT-RATE, not for fvlm54
    ("Small lymph nodes up to 7 mm are seen in the prevascular mediastinum.", 1, 0),
    ("Paratracheal lymph nodes that do not reach pathological size are present.", 1, 0),
    ("No lymph node of pathological size is seen in the mediastinum.", 0, 0),
    ("Enlarged lymph nodes are seen in the right hilum.", 1, 1),
])
def test_ctrate_lymph_node_convention(text, ctrate, fvlm):
    assert _pos("Lymphadenopathy", text) == ctrate
    assert _pos("Lymphadenopathy", text, "fvlm54") == fvlm


def test_ctrate_density_of_another_finding_is_not_an_opacity():
    t = "Density increases consistent with pleuroparenchymal sequelae are seen in the right upper lobe."
    assert _pos("Pulmonary fibrotic sequela", t) == 1
    assert _pos("Lung opacity", t) == 0
    assert _pos("Lung opacity", t, "fvlm54") == 1               # fvlm54 keeps its rule
    # a ground-glass synonym next to a consolidation still counts
    assert _pos("Lung opacity", "Ground-glass densities and consolidation in the left lower lobe.") == 1
    assert _pos("Lung opacity", "Patchy density increase in the left lower lobe.") == 1


def test_ctrate_coronary_plaques_are_not_arterial_wall_calcification():
    only = "Calcified atheroma plaques are seen in the coronary arteries."
    both = "Calcified atheroma plaques are seen in the aortic arch and the coronary arteries."
    assert _pos("Coronary artery wall calcification", only) == 1
    assert _pos("Arterial wall calcification", only) == 0
    assert _pos("Arterial wall calcification", only, "fvlm54") == 1
    assert _pos("Arterial wall calcification", both) == 1
    assert _pos("Coronary artery wall calcification", both) == 1


def test_ctrate_plural_sequelae_and_septa():
    assert _pos("Pulmonary fibrotic sequela", "Sequelae changes at both apices.") == 1
    assert _pos("Pulmonary fibrotic sequela", "Sequelae changes at both apices.", "fvlm54") == 1
    assert _pos("Interlobular septal thickening", "Crazy paving pattern in the right lower lobe.") == 0
    assert _pos("Interlobular septal thickening", "Crazy paving pattern in the right lower lobe.", "fvlm54") == 1


@pytest.mark.parametrize("tax", ["fvlm54", "ctrate18"])
def test_negation_through_finding_words_and_verb_closed_lists(tax):
    assert _pos("Lung opacity", "There was no finding compatible with pneumonia.", tax) == 0
    assert _pos("Lung opacity", "No imaging finding consistent with pneumonia was seen.", tax) == 0
    assert _pos("Consolidation", "No active infiltration, consolidation or mass was observed in both lungs.", tax) == 0
    assert _pos("Lung opacity", "The infiltration described before has completely regressed.", tax) == 0
    # a statement of its own after the list is not negated
    assert _pos("Consolidation", "No pleural effusion, a consolidation is seen in the left lower lobe.", tax) == 1
    # a hedge in parentheses qualifies only the parenthesis
    assert _pos("Mosaic attenuation pattern", "Mosaic attenuation pattern in both lungs (small airway disease?).", tax) == 1
    assert _pos("Consolidation", "Consolidation in the right lower lobe (pneumonia?).", tax) == 1


def test_yields_to_unknown_diagnosis_is_a_format_error(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({
        "format": "fvlm-taxonomy", "version": 1, "name": "t", "anatomy_set": "fvlm15",
        "lexicon": "anatomy/lexicon.yaml", "cues": "reports/cues.yaml",
        "diagnoses": [{"id": "a", "name": "A", "anatomy": "lung", "synonyms": ["x"], "yields_to": ["nope"]}]}))
    with pytest.raises(FormatError, match="yields_to unknown"):
        load_taxonomy(p)


# --------------------------------------------------------------------------- negation in linear time (issue 18)


def _naive_scope(n, seg_of, seg_verb, seg_first, cues, breaks):
    """Walk each cue's scope token by token, lists computed by walking segments (independent of negation.py)."""
    from preprocess.reports.negation import AFFIRM_STARTS, CONTINUE_STARTS
    out = [None] * n
    n_seg = len(seg_verb)

    def joins(s):
        return seg_first[s] in CONTINUE_STARTS or (not seg_verb[s] and seg_first[s] not in AFFIRM_STARTS)
    for c in cues:
        s = seg_of[c.start] if c.start < n else n_seg - 1
        if c.pre:
            last = s
            while last + 1 < n_seg and joins(last + 1):
                last += 1
            if (all(not seg_verb[x] for x in range(s, last + 1)) and last + 1 < n_seg and seg_verb[last + 1]
                    and seg_first[last + 1] not in AFFIRM_STARTS):
                last += 1
            for t in range(c.end, n):
                if seg_of[t] > last or t in breaks:
                    break
                if out[t] is None or t - c.end < out[t][0]:
                    out[t] = (t - c.end, c)
        if c.post:
            first = s
            while (c.value == 0 and first > 0 and not seg_verb[first - 1]
                   and seg_first[first - 1] not in AFFIRM_STARTS):
                first -= 1
            for t in range(c.start - 1, -1, -1):
                if seg_of[t] < first or t in breaks:
                    break
                if out[t] is None or c.start - 1 - t < out[t][0]:
                    out[t] = (c.start - 1 - t, c)
    return out


def test_linear_scope_equals_naive_scope_on_random_clauses():
    import random

    from preprocess.reports.negation import Cue, scope, scope_reference
    rng = random.Random(15)
    for _ in range(3000):
        n, n_seg = rng.randint(1, 25), rng.randint(1, 6)
        seg_of = sorted(rng.randrange(n_seg) for _ in range(n))
        seg_verb = [rng.random() < 0.4 for _ in range(n_seg)]
        seg_first = [rng.choice(["x", "or", "mild", "no", ""]) for _ in range(n_seg)]
        cues, t = [], 0
        while t < n:
            if rng.random() < 0.3:
                e = min(n, t + rng.randint(1, 3))
                pre = rng.random() < 0.6
                cues.append(Cue(t, e, rng.choice([0, -1]), pre, (not pre) or rng.random() < 0.4, "c"))
                t = e
            else:
                t += 1
        breaks = [i for i in range(n) if rng.random() < 0.1]
        want = _naive_scope(n, seg_of, seg_verb, seg_first, cues, set(breaks))
        key = lambda out: [(d, id(c)) if c else None for d, c in (x or (None, None) for x in out)]  # noqa: E731
        assert key(scope(n, seg_of, seg_verb, seg_first, cues, breaks)) == key(want)
        assert key(scope_reference(n, seg_of, seg_verb, seg_first, cues, breaks)) == key(want)


def test_pathological_report_labels_like_a_short_one():
    short = labeler().label(findings="No pleural effusion, " * 3)
    long = labeler().label(findings="No pleural effusion, " * 20000)     # 420,000 characters, < 1 s
    assert short.labels == long.labels
    assert long.labels["pleural_effusion"] == 0


def test_report_size_cap_truncates_and_logs(caplog):
    lab = ReportLabeler("fvlm54", max_chars=200)
    text = "Mild cardiomegaly. " + "No pleural effusion. " * 50 + "Hiatal hernia."
    with caplog.at_level("WARNING", logger="fvlm.reports"):
        out = lab.label(findings=text)
    assert "truncated from" in caplog.text and "max_chars=200" in caplog.text
    assert out.labels["cardiomegaly"] == 1
    assert out.labels["hiatal_hernia"] == 0                  # beyond the cap
    assert ReportLabeler("fvlm54").label(findings=text).labels["hiatal_hernia"] == 1
    with pytest.raises(FvlmError, match="max_chars"):
        ReportLabeler("fvlm54", max_chars=-1)


# --------------------------------------------------------------------------- CT-RATE development reports


def test_devset_split_is_fixed_and_by_patient():
    from preprocess.reports.devset import patient_of, split_part
    assert patient_of("train_44_a") == "train_44" and patient_of("valid_7_b") == "valid_7"
    assert split_part("train_44_a") == split_part("train_44_b")
    parts = [split_part(f"train_{i}_a") for i in range(2000)]
    assert 0.25 < parts.count("heldout") / len(parts) < 0.35


def test_ctrate_dev_reports_macro_f1():
    """CT-RATE's real reports (CC BY-NC-SA, read in place, never copied): both parts >= 0.90."""
    from preprocess.reports import devset
    path = devset.find_dev_reports()
    if path is None:
        pytest.skip("ctrate_dev.jsonl not present (../shared/data/reports/ or $FVLM_CTRATE_REPORTS)")
    reports = devset.load_dev_reports(path)
    lab = labeler("ctrate18")
    for part in ("dev", "heldout"):
        scores = devset.score_reports(lab, [r for r in reports if devset.split_part(r.id) == part])
        assert len(scores) == 18
        assert devset.macro_f1(scores) >= 0.90, (part, devset.f1_table({part: scores}))
