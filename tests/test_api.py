"""`fvlm.load(...)`: embed / predict / similarity / embed_text on the shipped sample CT, against the
suite's cached embeddings and `fvlm predict` (tiny untrained model, real preprocessing)."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("preprocess.case")

sys.path.insert(0, str(Path(__file__).parent))
from api_helpers import CT, SEG, make_checkpoint, make_shards  # noqa: E402

import fvlm  # noqa: E402
from fvlm.cli import main  # noqa: E402
from fvlm.errors import FvlmError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    shards = make_shards(d)
    ck = make_checkpoint(d / "model.pt", shards)
    return {"dir": d, "shards": shards, "ck": ck, "model": fvlm.load(ck, device="cpu")}


def _suite_embeddings(ck, shards, cache_dir):
    """What `fvlm zeroshot` computes and caches: encode_cases over the shards."""
    from fvlm.eval import loading
    from fvlm.eval.embed import EmbeddingCache, data_fingerprint, encode_cases, file_sha256

    net, meta, make_batch = loading.load_model(str(ck), "cpu")
    ds = loading.open_shards(str(shards))
    cache = EmbeddingCache(cache_dir, file_sha256(ck), data_fingerprint(shards))
    with torch.inference_mode():
        encode_cases(net, ds, ds.case_ids(), make_batch, 2, cache, get_kwargs=make_batch.get_kwargs)
    return cache.load()


def test_embed_nifti_equals_suite_cached_embedding(built, tmp_path):
    cached = _suite_embeddings(built["ck"], built["shards"], tmp_path / "cache")
    assert cached is not None and cached.case_ids == ["c0", "c1"]
    emb = built["model"].embed(str(CT), mask=str(SEG))
    row = cached.rows(["c0"])[0]
    assert set(emb.as_dict()) == set(cached.arrays) == set(built["model"].names)
    for key, arr in cached.arrays.items():
        np.testing.assert_allclose(emb.as_dict()[key], arr[row], atol=1e-5, rtol=0)
    assert emb.present == {a: bool(cached.present[a][row]) for a in built["model"].anatomies}
    assert emb.present["lung"] and not emb.present["heart"]          # the sample is an abdomen + lung base
    assert emb.global_.shape == (32,) and abs(float(np.linalg.norm(emb.global_)) - 1) < 1e-5


def test_embed_accepts_nibabel_arrays_and_batches(built):
    import nibabel as nib

    m = built["model"]
    ref = m.embed(str(CT), mask=str(SEG))
    img, seg = nib.load(str(CT)), nib.load(str(SEG))
    from_nib = m.embed(img, mask=seg)
    from_arr = m.embed(np.asarray(img.dataobj), mask=np.asarray(seg.dataobj), affine=img.affine)
    for e in (from_nib, from_arr):
        np.testing.assert_allclose(e.global_, ref.global_, atol=1e-6)
        np.testing.assert_allclose(e.anatomies["liver"], ref.anatomies["liver"], atol=1e-6)
        assert e.present == ref.present
    batch = m.embed([str(CT), img], mask=[str(SEG), seg], batch_size=2)
    assert len(batch) == 2
    np.testing.assert_allclose(batch[1].anatomies["lung"], ref.anatomies["lung"], atol=1e-5)
    with pytest.raises(FvlmError, match="affine"):
        m.embed(np.zeros((8, 8, 8), np.int16))
    with pytest.raises(FvlmError, match="no such file"):
        m.embed("/nonexistent/scan.nii.gz", mask=str(SEG))
    with pytest.raises(FvlmError, match="unknown anatomy"):
        ref.vector("brain")


def test_predict_equals_fvlm_predict(built, tmp_path, capsys):
    from fvlm.eval.predict import thresholds_sidecar, write_thresholds

    m = built["model"]
    ck = tmp_path / "model.pt"
    ck.write_bytes(Path(built["ck"]).read_bytes())
    sha = fvlm.load(ck, device="cpu").sha256()
    results = {"checkpoint": {"sha256": sha}, "scoring": {"rule": "pairwise", "prompts": "taxonomy",
                                                          "logit_scale": 20.0, "embedding": "anatomy"},
               "zeroshot": {"diagnoses": {"hepatic_steatosis": {"threshold": 0.0},
                                          "emphysema": {"threshold": 1.0}}}}
    write_thresholds(ck, results)
    assert thresholds_sidecar(ck).name == "model.pt.thresholds.json"
    out = tmp_path / "pred.json"
    assert main(["predict", "--checkpoint", str(ck), "--image", str(CT), "--mask", str(SEG), "--device", "cpu",
                 "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["preprocess_config"] == "checkpoint" and doc["thresholds_source"] == "thresholds.json"
    pred = fvlm.load(ck, device="cpu").predict(str(CT), mask=str(SEG))
    assert pred.rows == doc["predictions"] and len(pred.rows) == 54
    assert pred.thresholds_source == "thresholds.json" and pred.scoring["logit_scale"] == 20.0
    assert pred.calls["hepatic_steatosis"] == "positive" and pred.calls["emphysema"] == "negative"
    assert pred.calls["cardiomegaly"] is None                       # heart not in the scan
    assert "hepatic_steatosis" in pred.positives()
    # an Embedding can be scored directly, with the same numbers
    again = m.predict(m.embed(str(CT), mask=str(SEG)))
    assert again.scores == fvlm.load(built["ck"], device="cpu").predict(str(CT), mask=str(SEG)).scores
    # thresholds of another checkpoint are refused
    other = dict(results, checkpoint={"sha256": "0" * 64})
    with pytest.raises(FvlmError, match="another checkpoint"):
        m.predict(str(CT), mask=str(SEG), thresholds=other)


def test_embed_dicom_folder_and_totalsegmentator_fallback(built, ct_samples, monkeypatch):
    m = built["model"]
    emb = m.embed(str(ct_samples / "example_ct_dicom"), mask=str(ct_samples / "example_seg_dicom.nii.gz"))
    assert emb.global_.shape == (32,) and any(emb.present.values())
    # no mask: TotalSegmentator when its weights are found, else one clear error (never a download)
    import preprocess.case as case_mod

    monkeypatch.setattr(case_mod, "ts_available", lambda: False)
    with pytest.raises(FvlmError, match="TotalSegmentator weights are not installed"):
        m.embed(str(CT))
    calls = []

    def fake_ts(arr, affine, *a, **k):  # stands in for the real network: returns the shipped mask's labels
        import nibabel as nib

        calls.append(arr.shape)
        return np.asarray(nib.load(str(SEG)).dataobj).astype(np.uint8)

    monkeypatch.setattr(case_mod, "ts_available", lambda: True)
    monkeypatch.setattr(case_mod, "run_totalsegmentator", fake_ts)
    monkeypatch.setattr(case_mod, "ts_version", lambda: "fake")
    auto = m.embed(str(CT))
    assert calls and np.allclose(auto.global_, m.embed(str(CT), mask=str(SEG)).global_, atol=1e-6)


def test_similarity_and_embed_text(built):
    m = built["model"]
    emb = m.embed(str(CT), mask=str(SEG))
    texts = ["the liver is normal", "fatty liver with a cyst"]
    t = m.embed_text(texts, anatomy="liver")
    assert t.shape == (2, m.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    s = m.similarity(emb, texts, anatomy="liver")
    np.testing.assert_allclose(s, t @ emb.anatomies["liver"], atol=1e-6)
    np.testing.assert_allclose(m.similarity(emb.global_, texts), m.embed_text(texts) @ emb.global_, atol=1e-6)
    assert m.embed_text([]).shape == (0, m.embed_dim)
    with pytest.raises(FvlmError, match="unknown anatomy"):
        m.embed_text(texts, anatomy="brain")
    assert m.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_checkpoint_without_preprocess_settings_warns(built, tmp_path, caplog):
    ck = make_checkpoint(tmp_path / "old.pt", built["shards"], with_preprocess=False)
    m = fvlm.load(ck, device="cpu")
    with caplog.at_level(logging.WARNING):
        emb = m.embed(str(CT), mask=str(SEG))
    assert "no preprocessing settings" in caplog.text
    assert emb.present["liver"]
    assert m.preprocess_config().whole.shape == [384, 384, 128]    # the defaults, not the shards' [80, 64, 48]


def _readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no marked Python API example"
    return m.group(1)


def test_readme_example_runs(built, monkeypatch, capsys):
    code = _readme_snippet()
    assert len(code.strip().splitlines()) <= 12
    assert "runs/demo/train/fvlm/model.pt" in code
    code = code.replace("runs/demo/train/fvlm/model.pt", str(built["ck"]))
    monkeypatch.chdir(REPO)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(32,)" in out and "liver" in out


def test_import_is_light_and_all_is_public():
    code = ("import sys, fvlm; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(fvlm.__all__)); [getattr(fvlm, n) for n in fvlm.__all__]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "load" in r.stdout
    for name in fvlm.__all__:
        obj = getattr(fvlm, name)
        assert isinstance(obj, str) or (obj.__doc__ and obj.__doc__.strip()), name
    for meth in ("embed", "predict", "similarity", "embed_text", "preprocess", "embed_records", "anatomies",
                 "names", "embed_dim", "logit_scale", "sha256", "preprocess_config"):
        assert getattr(fvlm.Model, meth).__doc__, meth
    for cls, names in ((fvlm.Embedding, ("vector", "as_dict")),
                       (fvlm.Prediction, ("scores", "thresholds", "calls", "positives", "to_dict"))):
        for n in names:
            assert getattr(cls, n).__doc__, (cls, n)
