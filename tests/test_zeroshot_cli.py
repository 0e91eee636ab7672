"""`fvlm zeroshot` and `fvlm compare` end to end (synthetic model behind the real CLI and writers)."""
import json

import pytest

from fvlm.cli import main
from fvlm.eval import loading
from fvlm.eval import synthetic as S
from fvlm.eval.report import read_results
from fvlm.errors import FormatError


@pytest.fixture()
def synthetic_world(monkeypatch, tmp_path):
    tax = S.make_taxonomy()
    ds = S.SyntheticDataset(tax, n_patients={"train": 30, "val": 20, "test": 30}, seed=4)
    models = []

    def load_model(path, device="auto"):
        m = S.SyntheticModel(tax, signal=0.5)
        models.append(m)
        return m, {"step": 7}, S.make_batch

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(loading, "load_taxonomy", lambda name: tax)
    monkeypatch.setattr(loading, "open_shards", lambda root: ds)
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"synthetic checkpoint")
    data = tmp_path / "shards"
    data.mkdir()
    (data / "index.jsonl").write_text("{}\n")
    return tax, ds, models, ck, data


def test_zeroshot_command_writes_results_and_reuses_cache(synthetic_world, tmp_path, capsys):
    tax, ds, models, ck, data = synthetic_world
    out = tmp_path / "run1"
    argv = ["zeroshot", "--checkpoint", str(ck), "--data", str(data), "--out", str(out), "-q",
            "--set", "bootstrap.n=30"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "macro AUC" in printed and "never on the test split" in printed
    doc = read_results(out / "results.json")
    assert doc["format"] == "fvlm-zeroshot-results" and doc["version"] == 1
    assert doc["checkpoint"]["sha256"] and doc["data"]["hash"] and doc["checkpoint"]["meta"] == {"step": 7}
    assert doc["config"]["bootstrap"]["n"] == 30
    assert doc["ground_truth"]["source"] == "silver"
    assert doc["linear_probe"]["status"] == "ok" and doc["retrieval"]["report"]["n"] > 0
    assert (out / "results.md").read_text().startswith("# Zero-shot results")
    assert (out / "config.yaml").is_file() and (out / "zeroshot.log").is_file()
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["roc_global.png", "roc_heart.png", "roc_lung.png", "summary.png"]
    assert models[0].image_calls == doc["compute"]["cases_encoded"]
    # same checkpoint + data: embeddings come from the cache
    assert main(argv) == 0
    assert models[1].image_calls == 0
    # CLIP baseline next to it, then compare
    out2 = tmp_path / "clip"
    assert main(["zeroshot", "--checkpoint", str(ck), "--data", str(data), "--out", str(out2), "-q",
                 "--set", "bootstrap.n=30", "--clip-baseline"]) == 0
    assert read_results(out2)["config"]["scoring"]["clip_baseline"] is True
    capsys.readouterr()
    assert main(["compare", str(out / "results.json"), str(out2), "--names", "fvlm", "clip", "--ci"]) == 0
    table = capsys.readouterr().out
    assert "| **macro** |" in table and "Δ clip" in table and "lung_finding0 (lung)" in table


def test_zeroshot_ctrate_preset_and_labels(synthetic_world, tmp_path):
    tax, ds, models, ck, data = synthetic_world
    for c in ds.case_ids("test"):  # CT-RATE calls its evaluation split "valid"
        ds._cases[c].split = "valid"
    lab = tmp_path / "valid_labels.csv"
    diags = tax.diagnoses
    rows = ["VolumeName," + ",".join(d.ctrate or d.name for d in diags)]
    rows += [f"{c}.nii.gz," + ",".join(str(max(ds._cases[c].labels[d.id], 0)) for d in diags)
             for c in ds.case_ids("valid")]
    lab.write_text("\n".join(rows) + "\n")
    out = tmp_path / "ct"
    assert main(["zeroshot", "--ctrate", "--checkpoint", str(ck), "--data", str(data), "--out", str(out),
                 "--labels", str(lab), "-q", "--set", "bootstrap.n=20", "--set", "scoring.prompts=ctclip"]) == 0
    doc = read_results(out)
    assert doc["protocol"]["name"] == "ctrate" and doc["protocol"]["threshold_source"] == "train_subset"
    assert doc["ground_truth"]["source"] == "labels_file"
    assert doc["config"]["labels"] == [str(lab)]
    assert doc["scoring"]["prompts"] == "ctclip"
    assert "patient-disjoint subset of split 'train'" in doc["protocol"]["statement"]


def test_zeroshot_command_errors(synthetic_world, tmp_path, capsys):
    assert main(["zeroshot", "--data", "x", "--out", str(tmp_path)]) == 2
    assert "missing --checkpoint" in capsys.readouterr().err
    _, _, _, ck, data = synthetic_world
    assert main(["zeroshot", "--checkpoint", str(ck), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--set", "splits.test=holdout"]) == 2
    assert "no cases in the test split 'holdout'" in capsys.readouterr().err
    assert main(["zeroshot", "--checkpoint", str(ck), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--set", "scoring.rule=max"]) == 2
    assert "scoring.rule" in capsys.readouterr().err


def test_compare_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    assert main(["compare", str(bad), str(bad)]) == 2
    assert "not a fvlm-zeroshot-results file" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope.json"), str(bad)]) == 2
    assert "no such results file" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "fvlm-zeroshot-results", "version": 99}))
    with pytest.raises(FormatError, match="version 99"):
        read_results(old)


def test_missing_checkpoint_and_data_are_one_line_errors(tmp_path, capsys):
    from fvlm.cli import main

    assert main(["zeroshot", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    assert main(["zeroshot", "--checkpoint", str(ck), "--data", str(tmp_path / "no_shards"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "shard directory not found" in capsys.readouterr().err
