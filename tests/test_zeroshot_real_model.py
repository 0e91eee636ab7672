"""The suite on the real fVLM model class and input transform (tiny, untrained) over synthetic CT.

Checks the wiring, not accuracy: one ``encode_image`` call per case through the training
transform, prompts through the model's per-anatomy text heads, a strict-JSON document.
"""
import collections
import json

import pytest

torch = pytest.importorskip("torch")
models = pytest.importorskip("fvlm.models")
ct = pytest.importorskip("fvlm.data.ct")
synthetic_ct = pytest.importorskip("fvlm.data.synthetic_ct")

from fvlm.config import build  # noqa: E402
from fvlm.eval.config import ZeroShotConfig  # noqa: E402
from fvlm.eval.zeroshot import run_suite  # noqa: E402
from shard_helpers import write_synthetic_shards  # noqa: E402


def test_real_model_encodes_each_case_once():
    organs = ["lung", "heart"]
    src = synthetic_ct.SyntheticCTSource(n=16, anatomies=organs, shape=(32, 32, 16), crop_shape=(16, 16, 8),
                                         val_fraction=0.5, prevalence=0.4)
    torch.manual_seed(0)
    model = models.create_model("fvlm", {"anatomies": organs, "embed_dim": 32,
                                         "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16],
                                                   "patch_size": [8, 8, 4]},
                                         "text": {"model_dir": "tiny-random"}}).eval()
    make_batch = ct.make_batch_fn(ct.SampleOptions(anatomies=organs, volume_size=[32, 32, 16], crop_size=None))
    calls = collections.Counter()
    orig = model.encode_image

    def counted(batch):
        calls.update(batch["case_id"])
        return orig(batch)

    model.encode_image = counted
    cfg = build(ZeroShotConfig, {"splits": {"test": "valid"},
                                 "thresholds": {"source": "train_subset", "train_fraction": 0.5},
                                 "bootstrap": {"n": 10}, "min_positives": 1, "min_negatives": 1})
    with torch.inference_mode():
        res = run_suite(model, src, {"name": "synthetic-ct", "diagnoses": src.diagnoses}, cfg, make_batch).results
    assert len(calls) == 16 and set(calls.values()) == {1}
    assert res["compute"]["image_forwards"] == 16
    assert res["scoring"]["logit_scale"] == pytest.approx(float(model.get_logit_scale().detach()))
    assert res["zeroshot"]["macro"]["n_diagnoses"] + len(res["zeroshot"]["skipped"]) == len(src.diagnoses)
    json.dumps(res, allow_nan=False)


def test_zeroshot_command_on_real_checkpoint_and_shards(tmp_path, capsys):
    """`fvlm zeroshot` through load_consolidated, ShardDataset, the checkpoint's transform and fvlm54."""
    pytest.importorskip("fvlm.data.shards")
    ckmod = pytest.importorskip("fvlm.models.checkpoint")
    pytest.importorskip("fvlm.taxonomy")
    from fvlm.cli import main

    organs = ["lung", "heart", "liver", "kidney"]
    src = synthetic_ct.SyntheticCTSource(n=24, anatomies=organs, shape=(32, 32, 16), crop_shape=(16, 16, 8),
                                         val_fraction=0.5, prevalence=0.4, seed=3)
    root = tmp_path / "shards"
    _, recs = write_synthetic_shards(root, src, organs)
    # ground truth for the fvlm54 diagnoses the synthetic findings stand for
    mapping = {"lung_lesion": "lung_nodule", "liver_lesion": "liver_mass", "kidney_lesion": "renal_mass",
               "liver_hypodense": "hepatic_steatosis", "kidney_hypodense": "renal_hypodensity",
               "medical_material": "medical_material"}
    lines = ["case_id," + ",".join(mapping.values())]
    lines += [r.case_id + "," + ",".join(str(max(int(r.labels.get(k, -1)), 0)) for k in mapping) for r in recs]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    model = models.create_model("fvlm", {"anatomies": organs, "embed_dim": 32,
                                         "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16],
                                                   "patch_size": [8, 8, 4]},
                                         "text": {"model_dir": "tiny-random"}})
    opts = ct.SampleOptions(anatomies=organs, volume_size=[32, 32, 16], crop_size=None)
    ck = ckmod.save_consolidated(tmp_path / "model.pt", model, {"data": opts.to_dict(), "step": 3,
                                                                "taxonomy": "fvlm54"})
    out = tmp_path / "out"
    rc = main(["zeroshot", "--checkpoint", str(ck), "--data", str(root), "--out", str(out), "-q",
               "--taxonomy", "fvlm54", "--labels", str(tmp_path / "labels.csv"),
               "--set", "splits.test=valid", "--set", "thresholds.source=train_subset",
               "--set", "thresholds.train_fraction=0.5", "--set", "min_positives=1", "--set", "min_negatives=1",
               "--set", "bootstrap.n=10", "--set", "device=cpu"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert doc["compute"]["image_forwards"] == 24 and doc["checkpoint"]["meta"]["step"] == 3
    zs = doc["zeroshot"]
    assert set(zs["diagnoses"]) <= set(mapping.values()) and zs["diagnoses"]
    reasons = {s["id"]: s["reason"] for s in zs["skipped"]}
    assert "no column" in reasons["emphysema"]                      # fvlm54 diagnoses without ground truth
    assert "no 'colon' embedding" in reasons["colorectal_mass"]     # anatomies the model does not have
    assert len(zs["diagnoses"]) + len(zs["skipped"]) == 54
