"""`fvlm predict` on the shipped sample CT + mask, preprocessed in memory (tiny untrained model)."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("preprocess.case")
models = pytest.importorskip("fvlm.models")
ct = pytest.importorskip("fvlm.data.ct")
pytest.importorskip("fvlm.taxonomy")

from fvlm.anatomy import load_anatomy_set  # noqa: E402
from fvlm.cli import main  # noqa: E402
from fvlm.eval import loading  # noqa: E402


@pytest.fixture()
def tiny_checkpoint(monkeypatch, tmp_path):
    an = [a.id for a in load_anatomy_set("fvlm15")]
    opts = ct.SampleOptions(anatomies=an, volume_size=[32, 32, 16], crop_size=None)

    def load_model(path, device="auto"):
        torch.manual_seed(0)
        m = models.create_model("fvlm", {"anatomies": an, "embed_dim": 32,
                                         "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16],
                                                   "patch_size": [8, 8, 4]},
                                         "text": {"model_dir": "tiny-random"}}).eval()
        return m, {"data": opts.to_dict()}, ct.make_batch_fn(opts)

    monkeypatch.setattr(loading, "load_model", load_model)
    ck = tmp_path / "tiny.pt"
    ck.write_bytes(b"tiny")
    return ck


def test_predict_scores_one_scan_with_thresholds(tiny_checkpoint, ct_samples, tmp_path, capsys):
    from fvlm.eval.embed import file_sha256

    res = tmp_path / "results.json"
    res.write_text(json.dumps({
        "format": "fvlm-zeroshot-results", "version": 1,
        "checkpoint": {"sha256": file_sha256(tiny_checkpoint)},
        "scoring": {"rule": "pairwise", "prompts": "taxonomy", "logit_scale": 50.0, "embedding": "anatomy"},
        "zeroshot": {"diagnoses": {"emphysema": {"threshold": 0.0}, "cardiomegaly": {"threshold": 0.0}}}}))
    out = tmp_path / "pred.json"
    rc = main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(ct_samples / "example_ct_sm.nii.gz"),
               "--mask", str(ct_samples / "example_seg.nii.gz"), "--thresholds", str(res), "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "emphysema" in table and "positive" in table
    doc = json.loads(out.read_text())
    assert doc["format"] == "fvlm-predictions" and doc["thresholds_source"] == "results.json"
    assert doc["scoring"]["logit_scale"] == 50.0 and doc["mask_source"] == "precomputed"
    rows = {r["id"]: r for r in doc["predictions"]}
    assert len(rows) == 54 and all(0.0 <= r["score"] <= 1.0 for r in rows.values())
    assert rows["emphysema"]["call"] == "positive"           # threshold 0: every present score is positive
    assert rows["atelectasis"]["call"] is None               # no threshold: score only
    assert rows["cardiomegaly"]["anatomy_present"] is False and rows["cardiomegaly"]["call"] is None


def test_predict_errors(tiny_checkpoint, ct_samples, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "none.nii.gz")]) == 2
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "fvlm-zeroshot-results", "version": 1,
                                 "checkpoint": {"sha256": "0" * 64}, "zeroshot": {"diagnoses": {}}}))
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(ct_samples / "example_ct_sm.nii.gz"),
                 "--thresholds", str(other)]) == 2
    assert "computed for another checkpoint" in capsys.readouterr().err
