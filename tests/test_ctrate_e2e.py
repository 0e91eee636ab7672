"""End to end on a miniature CT-RATE layout: `fvlm preprocess` -> tiny `fvlm pretrain` -> `fvlm zeroshot`
with the ctrate18 taxonomy and CT-RATE's predicted_labels.csv (slow: DeepSpeed CPU ops, a few steps)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from fvlm.cli import main  # noqa: E402
from fvlm.data import ShardDataset  # noqa: E402
from fvlm.taxonomy import load_taxonomy  # noqa: E402
from test_ctrate import NAMES, SMALL, build_ctrate, check_geometry  # noqa: E402


@pytest.mark.slow
def test_ctrate_preprocess_pretrain_zeroshot(ct_samples, tmp_path, capsys):
    mdir = build_ctrate(tmp_path, ct_samples, v1=False)
    ds_dir, shards = tmp_path / "dataset", tmp_path / "shards"
    assert main(["preprocess", "--input", str(ds_dir), "--masks", str(mdir), "--out", str(shards), *SMALL]) == 0
    ds = ShardDataset(shards)
    assert sorted(ds.case_ids()) == sorted(NAMES["train"] + NAMES["valid"])
    for cid in ds.case_ids():
        check_geometry(ds, cid)
    pt = tmp_path / "pt"
    rc = main(["pretrain", "--config", "train/tiny.yaml", "--data", str(shards), "--out", str(pt),
               "--set", "train.steps=2", "--set", "train.ckpt_every=2", "--set", "val.enabled=false",
               "--set", "train.tensorboard=false", "--set", "data.batch_size=2"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    import torch
    raw = torch.load(pt / "model.pt", map_location="cpu", weights_only=True)
    assert raw["meta"]["step"] == 2
    assert raw["meta"]["preprocess"]["dataset"]["layout"]["anatomies"] == ds.anatomies    # trained on the shards
    res = tmp_path / "res"
    rc = main(["zeroshot", "--checkpoint", str(pt / "model.pt"), "--data", str(shards), "--taxonomy", "ctrate18",
               "--labels", str(ds_dir / "multi_abnormality_labels" / "predicted_labels.csv"), "--out", str(res),
               "-q", "--set", "splits.test=valid", "--set", "thresholds.source=train_subset",
               "--set", "thresholds.train_fraction=0.5", "--set", "min_positives=1", "--set", "min_negatives=1",
               "--set", "bootstrap.n=10", "--set", "device=cpu"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    doc = json.loads((res / "results.json").read_text())
    zs = doc["zeroshot"]
    assert doc["compute"]["image_forwards"] == 4
    listed = set(zs["diagnoses"]) | {s["id"] for s in zs["skipped"]}
    assert listed == {d.id for d in load_taxonomy("ctrate18").diagnoses}, listed


@pytest.mark.slow
def test_ctrate_no_masks_anywhere_is_one_line(ct_samples, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts_home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    build_ctrate(tmp_path, ct_samples, masks=None)
    rc = main(["preprocess", "--input", str(tmp_path / "dataset"), "--out", str(tmp_path / "o"), *SMALL])
    assert rc in (2, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
