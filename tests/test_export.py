"""`fvlm export` model directories, `fvlm embed`, and the checkpoint readers' failure modes:
bad safetensors, 0-byte / other-size / wrong-shape checkpoints, and pickles that must never run."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("preprocess.case")

sys.path.insert(0, str(Path(__file__).parent))
from api_helpers import CT, SEG, make_checkpoint, make_shards  # noqa: E402

import fvlm  # noqa: E402
from fvlm.cli import main  # noqa: E402
from fvlm.errors import FormatError, FvlmError  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    shards = make_shards(d)
    ck = make_checkpoint(d / "model.pt", shards)
    out = d / "exported"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out), "-q"]) == 0
    return {"dir": d, "shards": shards, "ck": ck, "out": out}


def _one_line_error(capsys, rc_expected=2):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_export_round_trip_is_bitwise_equal(built):
    out = built["out"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "fvlm-model-dir" and cfg["version"] == 1
    assert cfg["preprocess"]["dataset"]["layout"]["whole_shape"] == [80, 64, 48]
    assert (out / "model.safetensors").is_file() and "# fvlm model" in (out / "README.md").read_text()
    a, b = fvlm.load(built["ck"], device="cpu"), fvlm.load(out, device="cpu")
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = a.embed(str(CT), mask=str(SEG)), b.embed(str(CT), mask=str(SEG))
    for k, v in ea.as_dict().items():
        assert np.array_equal(v, eb.as_dict()[k]), k
    assert a.predict(ea).rows == b.predict(eb).rows
    texts = ["the liver is normal"]
    assert np.array_equal(a.embed_text(texts, "liver"), b.embed_text(texts, "liver"))


def test_cli_commands_take_the_model_directory(built, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(built["out"]), "--image", str(CT), "--mask", str(SEG),
                 "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ref = fvlm.load(built["ck"], device="cpu").predict(str(CT), mask=str(SEG))
    assert doc["predictions"] == ref.rows and doc["preprocess_config"] == "checkpoint"
    assert doc["checkpoint"]["sha256"] == fvlm.load(built["out"], device="cpu").sha256()


def test_export_carries_thresholds_and_results(built, tmp_path, capsys):
    from fvlm.eval.predict import write_thresholds

    ck = tmp_path / "m.pt"
    ck.write_bytes(Path(built["ck"]).read_bytes())
    sha = fvlm.load(ck, device="cpu").sha256()
    doc = {"checkpoint": {"sha256": sha}, "scoring": {"rule": "pairwise", "logit_scale": 10.0},
           "zeroshot": {"diagnoses": {"hepatic_steatosis": {"threshold": 0.25}}}}
    write_thresholds(ck, doc)
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"format": "fvlm-zeroshot-results", "version": 1, **doc,
                               "zeroshot": {"diagnoses": {"hepatic_steatosis": {"threshold": 0.25, "anatomy": "liver",
                                                                                "auc": {"value": 0.75, "ci": [0.6, 0.9]}}},
                                            "macro": {"overall": {"auc": {"value": 0.75, "ci": [0.6, 0.9]}},
                                                      "n_diagnoses": 1}}}))
    out = tmp_path / "dir"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out), "--results", str(res)]) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()
    assert "macro AUC 0.750" in card and "| hepatic_steatosis | liver | 0.750 | 0.250 |" in card
    pred = fvlm.load(out, device="cpu").predict(str(CT), mask=str(SEG))
    assert pred.thresholds["hepatic_steatosis"] == 0.25 and pred.thresholds_source == "checkpoint"
    assert pred.scoring["logit_scale"] == 10.0
    # results of another checkpoint are refused
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "fvlm-zeroshot-results", "version": 1,
                                 "checkpoint": {"sha256": "0" * 64}, "zeroshot": {"diagnoses": {}}}))
    assert main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "d2"), "--results", str(other)]) == 2
    assert "another checkpoint" in _one_line_error(capsys)


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rehash(d):
    """Record the edited weights' SHA-256, as a careful hand edit would (else the hash check refuses first)."""
    import hashlib

    cfg = json.loads((d / "config.json").read_text())
    cfg["weights"]["sha256"] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    (d / "config.json").write_text(json.dumps(cfg))


def test_bad_safetensors_give_one_line_errors(built, tmp_path, capsys):
    sd = safetensors_torch.load_file(str(built["out"] / "model.safetensors"))
    key = "image_proj.w1"
    # one tensor of another shape
    bad = _copy_dir(built["out"], tmp_path / "shape")
    sd2 = dict(sd)
    sd2[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1], sd[key].shape[2] + 1)
    safetensors_torch.save_file(sd2, str(bad / "model.safetensors"))
    _rehash(bad)
    with pytest.raises(FormatError, match=rf"tensor '{key}' has shape .* expects"):
        fvlm.load(bad, device="cpu")
    assert main(["predict", "--checkpoint", str(bad), "--image", str(CT), "--mask", str(SEG)]) == 2
    err = _one_line_error(capsys)
    assert key in err and "model.safetensors" in err
    # one tensor missing
    miss = _copy_dir(built["out"], tmp_path / "missing")
    safetensors_torch.save_file({k: v for k, v in sd.items() if k != "logit_scale"}, str(miss / "model.safetensors"))
    _rehash(miss)
    with pytest.raises(FormatError, match="tensor 'logit_scale' is missing"):
        fvlm.load(miss, device="cpu")
    # not a safetensors file at all
    junk = _copy_dir(built["out"], tmp_path / "junk")
    (junk / "model.safetensors").write_bytes(b"\x00" * 7)
    _rehash(junk)
    assert main(["predict", "--checkpoint", str(junk), "--image", str(CT)]) == 2
    assert "not a readable safetensors file" in _one_line_error(capsys)
    # a folder that is not a model directory
    assert main(["predict", "--checkpoint", str(tmp_path), "--image", str(CT)]) == 2
    assert "without config.json" in _one_line_error(capsys)


def test_checkpoint_errors_are_one_line(built, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["predict", "--checkpoint", str(empty), "--image", str(CT), "--mask", str(SEG)]) == 2
    assert "empty file" in _one_line_error(capsys)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(Path(built["ck"]).read_bytes()[:4000])
    assert main(["predict", "--checkpoint", str(trunc), "--image", str(CT), "--mask", str(SEG)]) == 2
    assert "not a loadable fvlm model file" in _one_line_error(capsys)
    # another model size: a checkpoint with embed_dim 48 whose config says 32
    big = make_checkpoint(tmp_path / "big.pt", built["shards"], embed_dim=48)
    obj = torch.load(big, weights_only=True)
    obj["config"]["embed_dim"] = 32
    torch.save(obj, tmp_path / "size.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "size.pt"), "--image", str(CT), "--mask", str(SEG)]) == 2
    assert "another model size" in _one_line_error(capsys)
    # one wrong tensor shape in a .pt
    obj = torch.load(built["ck"], weights_only=True)
    obj["state_dict"]["pool.q"] = torch.zeros(3, 3)
    torch.save(obj, tmp_path / "shape.pt")
    assert main(["zeroshot", "--checkpoint", str(tmp_path / "shape.pt"), "--data", str(built["shards"]),
                 "--out", str(tmp_path / "zs"), "-q", "--set", "device=cpu"]) == 2
    assert "tensor 'pool.q' has shape [3, 3]" in _one_line_error(capsys)


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_never_run(built, tmp_path, capsys):
    from fvlm.encoders import read_torch_file
    from fvlm.eval.embed import EmbeddingCache

    marker = tmp_path / "pwned"
    # consolidated checkpoint
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fvlm-model", "version": 1, "config": {}, "meta": {}, "state_dict": {},
                "model": "fvlm", "x": _Payload(marker)}, evil)
    assert main(["predict", "--checkpoint", str(evil), "--image", str(CT)]) == 2
    assert "not a loadable fvlm model file" in _one_line_error(capsys)
    with pytest.raises(FormatError):
        fvlm.load(evil)
    # dense checkpoint, X-ray encoder and pretrained weights all go through read_torch_file
    from fvlm.models.dense import load_dense
    from fvlm.models.xray_mae import load_encoder

    for fn in (lambda p: load_dense(p), lambda p: load_encoder(p), lambda p: read_torch_file(p, "weights file")):
        with pytest.raises(FvlmError):
            fn(str(evil))
    assert main(["dense", "eval", "--checkpoint", str(evil)]) == 2
    assert "cannot read dense checkpoint" in _one_line_error(capsys)
    # embedding cache: an object array inside the npz is not loaded (allow_pickle=False) -> rebuilt
    cache = EmbeddingCache(tmp_path / "cache", "a" * 16, "b" * 16)
    cache.path.parent.mkdir()
    with open(cache.path, "wb") as f:
        np.savez(f, case_ids=np.asarray(["c0"]), emb__global=np.asarray([_Payload(marker)], dtype=object))
    assert cache.load() is None
    assert "ignoring unreadable embedding cache" in capsys.readouterr().err
    # a pickled thresholds sidecar is not JSON: refused
    ck = tmp_path / "m.pt"
    ck.write_bytes(Path(built["ck"]).read_bytes())
    (tmp_path / "m.pt.thresholds.json").write_bytes(pickle.dumps(_Payload(marker)))
    assert main(["predict", "--checkpoint", str(ck), "--image", str(CT), "--mask", str(SEG)]) == 2
    assert "not valid JSON" in _one_line_error(capsys)
    assert not marker.exists()


def test_embed_command_parquet_resume_and_npz(built, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    from fvlm.eval import loading
    from fvlm.eval.embed import encode_cases

    net, meta, make_batch = loading.load_model(str(built["ck"]), "cpu")
    ds = loading.open_shards(str(built["shards"]))
    with torch.inference_mode():
        ref = encode_cases(net, ds, ds.case_ids(), make_batch, 1, get_kwargs=make_batch.get_kwargs)
    out = tmp_path / "emb.parquet"
    args = ["embed", "--checkpoint", str(built["out"]), "--data", str(built["shards"]), "--out", str(out),
            "--chunk", "1", "--batch-size", "1", "--device", "cpu", "-q"]
    assert main(args) == 0
    t = pq.read_table(out)
    assert t.column("case_id").to_pylist() == ["c0", "c1"] and t.column("split").to_pylist() == ["train", "valid"]
    assert t.column("patient_id").to_pylist() == ["p0", "p1"]
    state = json.loads(t.schema.metadata[b"fvlm"])
    assert state["format"] == "fvlm-embeddings" and state["embed_dim"] == 32
    for name in net.names:
        got = np.asarray(t.column(f"emb_{name}").to_pylist(), np.float32)
        np.testing.assert_allclose(got, ref.arrays[name], atol=1e-6)
    assert t.column("present_liver").to_pylist() == [True, True]
    assert main(args) == 2                                    # finished output is never overwritten
    assert "exists" in _one_line_error(capsys)
    # resume: a run killed after its first part leaves <out>.parts/ with one part; the rerun adds only c1
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    first = t.slice(0, 1).replace_schema_metadata(None)
    pq.write_table(first, parts / "part-00000.parquet")
    (parts / "state.json").write_text(json.dumps(state))
    out.unlink()
    calls = []
    orig = type(net).encode_image

    def counted(self, batch):
        calls.append(list(batch["case_id"]))
        return orig(self, batch)

    from unittest import mock

    with mock.patch.object(type(net), "encode_image", counted):
        assert main(args) == 0
    assert calls == [["c1"]]
    assert "1 from an earlier run" in capsys.readouterr().out
    t2 = pq.read_table(out)
    assert t2.column("case_id").to_pylist() == ["c0", "c1"] and not parts.exists()
    np.testing.assert_allclose(np.asarray(t2.column("emb_global").to_pylist()), ref.arrays["global"], atol=1e-6)
    # parts of another run are refused
    other = tmp_path / "other.parquet"
    other.with_name(other.name + ".parts").mkdir()
    (other.with_name(other.name + ".parts") / "state.json").write_text(
        json.dumps({**state, "checkpoint": {"sha256": "0"}}))
    assert main([a if a != str(out) else str(other) for a in args]) == 2
    assert "parts of another run" in _one_line_error(capsys)
    out2 = tmp_path / "emb.npz"
    assert main(["embed", "--checkpoint", str(built["ck"]), "--data", str(built["shards"]), "--out", str(out2),
                 "--device", "cpu", "-q", "--split", "valid"]) == 0
    with np.load(out2, allow_pickle=False) as z:
        assert list(z["case_id"]) == ["c1"] and z["emb_global"].shape == (1, 32)
        np.testing.assert_allclose(z["emb_liver"][0], ref.arrays["liver"][1], atol=1e-6)
    assert main(["embed", "--checkpoint", str(built["ck"]), "--data", str(built["shards"]),
                 "--out", str(tmp_path / "e.csv")]) == 2
    assert "parquet or .npz" in _one_line_error(capsys)


def test_export_with_the_text_model_loads_from_the_folder(built, tmp_path, capsys):
    """A frozen pretrained text encoder is not stored in model.pt (external); --include-text-model
    copies its files (safetensors only) into DIR/text, and loading uses that copy."""
    from fvlm.data import ShardDataset
    from fvlm.models import create_model
    from fvlm.models.checkpoint import save_consolidated
    from fvlm.resources import default_text_model_dir

    if default_text_model_dir() is None:
        pytest.skip("the shipped MiniLM text model is not installed")
    an = ShardDataset(built["shards"]).anatomies
    torch.manual_seed(1)
    model = create_model("fvlm", {"anatomies": an, "embed_dim": 16,
                                  "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16], "patch_size": [8, 8, 4]}})
    from fvlm.data.ct import SampleOptions

    ck = save_consolidated(tmp_path / "minilm.pt", model,
                           {"data": SampleOptions(anatomies=an, volume_size=[32, 32, 16]).to_dict()})
    out = tmp_path / "dir"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out), "--include-text-model"]) == 0
    capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text"]["weights"] == "external" and cfg["text"]["dir"] == "text"
    assert (out / "text" / "model.safetensors").is_file() and (out / "text" / "tokenizer.json").is_file()
    stored = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("text_encoder.") for k in stored)
    m = fvlm.load(out, device="cpu")
    assert Path(m.net.text_identity["path"]) == out / "text"
    texts = ["The liver is normal."]
    assert np.array_equal(m.embed_text(texts, "liver"), fvlm.load(ck, device="cpu").embed_text(texts, "liver"))
    # the tiny test text model has no folder to copy: one line
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(tmp_path / "d3"),
                 "--include-text-model"]) == 2
    assert "nothing to copy" in _one_line_error(capsys)
