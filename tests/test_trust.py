"""Trust boundaries (issue 35): files other people hand you are checked once, where they are read.

Model folders (hash, paths, dtypes, finiteness), ``fvlm export`` targets (never destroy what it
did not write), shards (structure on open, values on read, paths inside the root), threshold
sidecars (tied to the checkpoint hash), configs (size, aliases, includes, values) and the Python
API's arguments. Each bad input gives one line and exit 2 (``FvlmError`` in Python).
"""
import json
import os
import stat
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("preprocess.case")

sys.path.insert(0, str(Path(__file__).parent))
from api_helpers import make_checkpoint, make_shards  # noqa: E402
from cli_helpers import one_line as _one_line  # noqa: E402

import fvlm  # noqa: E402
from fvlm.cli import main  # noqa: E402
from fvlm.errors import FvlmError  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    shards = make_shards(d)
    ck = make_checkpoint(d / "model.pt", shards)
    out = d / "exported"
    assert main(["export", "--checkpoint", str(ck), "--out", str(out), "-q"]) == 0
    return {"dir": d, "shards": shards, "ck": ck, "out": out}


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


# --------------------------------------------------------------------------- export never destroys


def test_export_refuses_a_folder_it_did_not_write(built, tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bert"}')
    (d / "model.safetensors").write_bytes(b"theirs")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d)]) == 2
    _one_line(capsys, "did not write", "--overwrite")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folder left beside
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d), "--overwrite", "-q"]) == 0
    assert json.loads((d / "config.json").read_text())["format"] == "fvlm-model-dir"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("hf.replaced-")]  # moved aside, never deleted
    assert len(kept) == 1 and {p.name: p.read_bytes() for p in kept[0].iterdir()} == before
    assert "earlier contents are kept in" in capsys.readouterr().out


def test_export_replaces_its_own_folder_but_not_what_was_added(built, tmp_path, capsys):
    d = tmp_path / "m"
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d), "-q"]) == 0
    assert (d / ".fvlm-export").is_file()
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d), "-q"]) == 0  # re-export: fine
    (d / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d)]) == 2
    _one_line(capsys, "notes.txt")
    assert (d / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_files_follow_the_umask(built, tmp_path):
    old = os.umask(0o022)
    try:
        d = tmp_path / "shared"
        assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d), "-q"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_export_is_atomic(built, tmp_path, monkeypatch, capsys):
    from fvlm.models import model_dir

    d = tmp_path / "m"
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d), "-q"]) == 0
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*a, **k):
        raise OSError(28, "No space left on device", str(d))

    monkeypatch.setattr(model_dir, "_apply_umask", boom)
    assert main(["export", "--checkpoint", str(built["ck"]), "--out", str(d)]) == 2
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --------------------------------------------------------------------------- model folders


def _edit_config(d: Path, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _resave(d: Path, fn):
    sd = safetensors_torch.load_file(str(d / "model.safetensors"))
    fn(sd)
    safetensors_torch.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    import hashlib

    sha = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    _edit_config(d, lambda c: c["weights"].__setitem__("sha256", sha))


def _first_float(sd):
    return next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)


@pytest.mark.parametrize("kind, words", [
    ("escape", ["outside the model directory"]),
    ("absolute", ["outside the model directory"]),
    ("sha_mismatch", ["SHA-256 does not match"]),
    ("sha_missing", ["sha256 is missing"]),
    ("flipped_byte", ["SHA-256 does not match"]),
    ("nan", ["non-finite"]),
    ("float16", ["float16", "another dtype"]),
    ("weights_not_mapping", ["'weights' must be a mapping"]),
    ("config_list", ["'config' must be a mapping"]),
    ("model_int", ["'model' must be a string"]),
    ("version_str", ["version '1' is not supported"]),
    ("text_escape", ["outside the model directory"]),
    ("weights_symlink_out", ["outside the model directory"]),
    ("embed_dim_copy_disagrees", ["embed_dim -4 disagrees with config.embed_dim"]),
    ("anatomies_copy_disagrees", ["meta.anatomies [] disagrees with config.anatomies"]),
])
def test_bad_model_folder_is_one_line_exit_2(built, tmp_path, capsys, kind, words):
    d = _copy_dir(built["out"], tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    if kind == "escape":
        _edit_config(d, lambda c: c["weights"].__setitem__("file", "../elsewhere/model.safetensors"))
    elif kind == "absolute":
        _edit_config(d, lambda c: c["weights"].__setitem__("file", str(elsewhere / "model.safetensors")))
    elif kind == "sha_mismatch":
        _edit_config(d, lambda c: c["weights"].__setitem__("sha256", "0" * 64))
    elif kind == "sha_missing":
        _edit_config(d, lambda c: c["weights"].pop("sha256"))
    elif kind == "flipped_byte":
        b = bytearray((d / "model.safetensors").read_bytes())
        b[-5] ^= 0x40
        (d / "model.safetensors").write_bytes(bytes(b))
    elif kind == "nan":
        _resave(d, lambda sd: sd[_first_float(sd)].fill_(float("nan")))
    elif kind == "float16":
        _resave(d, lambda sd: sd.update({k: v.half() for k, v in sd.items() if v.is_floating_point()}))
    elif kind == "weights_not_mapping":
        _edit_config(d, lambda c: c.__setitem__("weights", "model.safetensors"))
    elif kind == "config_list":
        _edit_config(d, lambda c: c.__setitem__("config", []))
    elif kind == "model_int":
        _edit_config(d, lambda c: c.__setitem__("model", 5))
    elif kind == "version_str":
        _edit_config(d, lambda c: c.__setitem__("version", "1"))
    elif kind == "weights_symlink_out":
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    elif kind == "embed_dim_copy_disagrees":
        _edit_config(d, lambda c: c.__setitem__("embed_dim", -4))
    elif kind == "anatomies_copy_disagrees":
        _edit_config(d, lambda c: c["meta"].__setitem__("anatomies", []))
    elif kind == "text_escape":
        (elsewhere / "config.json").write_text("{}")
        _edit_config(d, lambda c: c.__setitem__("text", {"dir": "../elsewhere"}))
    with pytest.raises(FvlmError) as e:
        fvlm.load(d, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert main(["embed", "--checkpoint", str(d), "--data", str(built["shards"]), "--out",
                 str(tmp_path / "e.parquet"), "-q"]) == 2
    _one_line(capsys, "fvlm embed: error:")


# --------------------------------------------------------------------------- shards


def _h5_edit(root: Path, fn):
    from fvlm.data.shards import open_h5

    with open_h5(root / "shards" / "000-00000.h5", "r+") as f:
        fn(f)


def _index_edit(root: Path, fn):
    rows = [json.loads(x) for x in (root / "index.jsonl").read_text().splitlines() if x.strip()]
    rows = fn(rows)
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _replace(f, name, arr):
    del f[name]
    f.create_dataset(name, data=arr)


def _bad_shards(kind: str, src: Path, tmp: Path) -> Path:
    import shutil

    import numpy as np

    root = tmp / "shards"
    shutil.copytree(src, root)
    if kind == "index_escape":
        other = tmp / "other"
        other.mkdir()
        shutil.copy(root / "shards" / "000-00000.h5", other / "x.h5")
        _index_edit(root, lambda rows: [{**r, "shard": "../other/x.h5"} for r in rows])
    elif kind == "index_symlink_out":
        other = tmp / "other"
        other.mkdir()
        shutil.move(root / "shards" / "000-00000.h5", other / "x.h5")
        (root / "shards" / "000-00000.h5").symlink_to(other / "x.h5")
    elif kind == "index_absolute":
        _index_edit(root, lambda rows: [{**r, "shard": str(root / "shards" / "000-00000.h5")} for r in rows])
    elif kind == "index_duplicate":
        _index_edit(root, lambda rows: rows + rows[:1])
    elif kind == "index_past_end":
        _index_edit(root, lambda rows: [{**r, "row": r["row"] + 5} for r in rows])
    elif kind == "index_not_utf8":
        (root / "index.jsonl").write_bytes((root / "index.jsonl").read_bytes() + b"\xff\xfe\n")
    elif kind == "index_not_object":
        _index_edit(root, lambda rows: rows + [[1, 2]])
    elif kind == "index_row_str":
        _index_edit(root, lambda rows: [{**r, "row": "0"} for r in rows])
    elif kind == "no_volume":
        _h5_edit(root, lambda f: f["volume"].__delitem__("0"))
    elif kind == "no_label_map":
        _h5_edit(root, lambda f: f["label_map"].__delitem__("0"))
    elif kind == "no_bbox":
        _h5_edit(root, lambda f: f.__delitem__("bbox"))
    elif kind == "version_3":
        _h5_edit(root, lambda f: f.attrs.__setitem__("version", 3))
    elif kind == "version_str":
        _h5_edit(root, lambda f: f.attrs.__setitem__("version", "two"))
    elif kind == "label_shape":
        _h5_edit(root, lambda f: _replace(f, "label_map/0", np.zeros((10, 10, 10), np.uint8)))
    elif kind == "label_ids":
        _h5_edit(root, lambda f: _replace(f, "label_map/0", np.full(f["volume/0"].shape, 200, np.uint8)))
    elif kind == "float_nan":
        def fl(f):
            v = f["volume/0"][()].astype(np.float32)
            v[0, 0, 0] = np.nan
            _replace(f, "volume/0", v)
        _h5_edit(root, fl)
    elif kind == "spacing_nan":
        def sp(f):
            f["spacing_mm"][0] = [np.nan, 1.0, 1.0]
        _h5_edit(root, sp)
    elif kind == "bbox_outside":
        def bb(f):
            b = f["bbox"][0]
            j = int(np.flatnonzero(f["present"][0])[0])
            b[j] = [0, 0, 0, 9999, 10, 10]
            f["bbox"][0] = b
        _h5_edit(root, bb)
    elif kind == "report_not_json":
        def rep(f):
            f["report"][0] = "{not json"
        _h5_edit(root, rep)
    elif kind == "dataset_json_garbage":
        (root / "dataset.json").write_text("{not json")
    elif kind == "dataset_json_list":
        (root / "dataset.json").write_text("[1, 2]")
    elif kind == "dataset_json_layout":
        info = json.loads((root / "dataset.json").read_text())
        info["layout"]["crop_shapes"] = {"lung": [0, 4]}
        (root / "dataset.json").write_text(json.dumps(info))
    return root


SHARD_CASES = [
    ("index_escape", ["outside"]), ("index_absolute", ["outside"]), ("index_symlink_out", ["outside"]), ("index_duplicate", ["listed twice", "c0"]),
    ("index_past_end", ["c0", "row 5"]), ("index_not_utf8", ["not UTF-8"]), ("index_not_object", ["row 3"]), ("index_row_str", ["not a row number"]),
    ("no_volume", ["c0", "volume/0 is missing"]), ("no_label_map", ["c0", "label_map/0 is missing"]),
    ("no_bbox", ["'bbox' is missing"]), ("version_3", ["version 3"]), ("version_str", ["version -1"]),
    ("label_shape", ["c0", "label map shape"]), ("label_ids", ["c0", "label id 200"]),
    ("float_nan", ["c0", "float32"]), ("spacing_nan", ["c0", "spacing"]), ("bbox_outside", ["c0", "outside"]),
    ("report_not_json", ["c0", "'report' is not a JSON object"]),
    ("dataset_json_garbage", ["not valid JSON"]), ("dataset_json_list", ["not an object"]),
    ("dataset_json_layout", ["malformed layout"]),
]


@pytest.mark.parametrize("kind, words", SHARD_CASES)
def test_bad_shards_are_one_format_error_naming_the_case(built, tmp_path, kind, words):
    from fvlm.data.shards import ShardDataset
    from fvlm.errors import FormatError

    root = _bad_shards(kind, built["shards"], tmp_path)
    import numpy as np

    with pytest.raises(FormatError) as e:
        ds = ShardDataset(root)
        for cid in ds.case_ids():
            ds.get(cid)
    msg = str(e.value)
    if kind.startswith(("no_volume", "no_label", "label_", "float_", "spacing_", "bbox_")):  # the sample path's reader too
        with pytest.raises(FormatError, match="c0"):
            ds = ShardDataset(root)
            vol, lab = ds.stored("c0")
            np.asarray(lab)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("kind", ["index_escape", "no_volume", "label_ids", "dataset_json_garbage"])
def test_bad_shards_exit_2_from_embed_and_leave_no_output(built, tmp_path, capsys, kind):
    root = _bad_shards(kind, built["shards"], tmp_path)
    out = tmp_path / "e.parquet"
    assert main(["embed", "--checkpoint", str(built["ck"]), "--data", str(root), "--out", str(out),
                 "--device", "cpu", "-q"]) == 2
    _one_line(capsys, "fvlm embed: error:")
    assert not out.exists()


def test_good_shards_still_read(built):
    from fvlm.data.shards import ShardDataset

    ds = ShardDataset(built["shards"])
    for cid in ds.case_ids():
        rec = ds.get(cid)
        assert rec.volume.dtype.name == "int16" and rec.label_map.max() <= len(ds.anatomies)


# --------------------------------------------------------------------------- configs


def _cfg(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("kind, words", [
    ("base_absolute_outside", ["outside configs/", "refused"]),
    ("base_relative_escape", ["outside configs/", "refused"]),
    ("base_not_yaml", ["not a .yaml file"]),
    ("base_loop", ["_base_ loop", "a.yaml -> b.yaml -> a.yaml"]),
    ("base_self", ["_base_ loop", "a.yaml -> a.yaml"]),
    ("billion_laughs", ["billion laughs"]),
    ("huge_list", ["a config file may hold"]),
    ("recursive_anchor", ["refused"]),
    ("deep_nesting", ["refused"]),
    ("lr_nan", ["train.lr", "finite"]),
    ("batch_negative", ["data.batch_size", "above 0"]),
    ("duplicate_key", ["key 'train' appears twice", "lines 1 and 3"]),
    ("steps_zero", ["train.steps must be 1 or more"]),
    ("grad_accum_zero", ["train.grad_accum must be 1 or more"]),
    ("warmup_negative", ["train.warmup_steps must be 0 or more"]),
    ("volume_size_two_axes", ["data.volume_size", "needs 3 numbers"]),
])
def test_bad_config_is_one_line_exit_2_and_never_quotes_a_refused_file(tmp_path, capsys, kind, words):
    secret = _cfg(tmp_path, "private/secret.yaml", "password: hunter2\n")
    (tmp_path / "private" / "shadow").write_text("root:$6$hunter2:19000:0:99999:7:::\n")
    sets = []
    if kind == "base_absolute_outside":
        a = _cfg(tmp_path, "cfg/a.yaml", f"_base_: {secret}\n")
    elif kind == "base_relative_escape":
        a = _cfg(tmp_path, "cfg/a.yaml", "_base_: ../private/secret.yaml\n")
    elif kind == "base_not_yaml":
        a = _cfg(tmp_path, "cfg/a.yaml", f"_base_: {tmp_path / 'private' / 'shadow'}\n")
    elif kind == "base_loop":
        a = _cfg(tmp_path, "cfg/a.yaml", "_base_: b.yaml\n")
        _cfg(tmp_path, "cfg/b.yaml", "_base_: a.yaml\n")
    elif kind == "base_self":
        a = _cfg(tmp_path, "cfg/a.yaml", "_base_: a.yaml\n")
    elif kind == "billion_laughs":
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
        a = _cfg(tmp_path, "cfg/a.yaml", "\n".join(lines) + "\n")
    elif kind == "huge_list":
        a = _cfg(tmp_path, "cfg/a.yaml", "x:\n" + "- 1\n" * 600_000)
    elif kind == "recursive_anchor":
        a = _cfg(tmp_path, "cfg/a.yaml", "x: &a [*a]\n")
    elif kind == "deep_nesting":
        a = _cfg(tmp_path, "cfg/a.yaml", "x: " + "[" * 20_000 + "]" * 20_000 + "\n")
    elif kind == "lr_nan":
        a, sets = None, ["--set", "train.lr=nan"]
    elif kind == "batch_negative":
        a, sets = None, ["--set", "data.batch_size=-3"]
    elif kind == "duplicate_key":   # YAML keeps the last silently
        a = _cfg(tmp_path, "cfg/a.yaml", "train:\n  steps: 3\ntrain:\n  lr: 0.1\n")
    elif kind in ("steps_zero", "grad_accum_zero", "warmup_negative", "volume_size_two_axes"):
        a, sets = None, ["--set", {"steps_zero": "train.steps=0", "grad_accum_zero": "train.grad_accum=0",
                                   "warmup_negative": "train.warmup_steps=-1",
                                   "volume_size_two_axes": "data.volume_size=[32,32]"}[kind]]
    argv = ["config", "show", "pretrain", *(["--config", a] if a else []), *sets]
    import time

    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 10
    err = _one_line(capsys, "fvlm config: error:", *words)
    assert "hunter2" not in err and "password" not in err and "root:" not in err


def test_includes_inside_configs_and_beside_the_file_still_work(tmp_path):
    from dataclasses import dataclass

    from fvlm.config import load_config, opt, read_yaml

    a = _cfg(tmp_path, "cfg/a.yaml", "_base_: [sub/b.yaml, train/tiny.yaml]\nname: a\n")
    _cfg(tmp_path, "cfg/sub/b.yaml", "x: 1\n")
    d = read_yaml(a)
    assert d["name"] == "a" and d["x"] == 1 and "train" in d

    @dataclass
    class S:
        y: int = opt(0, "")

    other = _cfg(tmp_path, "other/c.yaml", "y: 2\n")
    b = _cfg(tmp_path, "cfg/b2.yaml", f"_base_: {other}\n")
    with pytest.raises(FvlmError, match="outside configs/"):
        load_config(S, files=[b])
    # named on the command line too: its folder is trusted
    assert load_config(S, files=[other, b]).y == 2


# --------------------------------------------------------------------------- thresholds sidecars


@pytest.fixture(scope="module")
def loaded(built, tmp_path_factory):
    """A copy of the checkpoint loaded once, and one embedding (sidecar tests write beside the copy)."""
    from fvlm.data.shards import ShardDataset

    ck = tmp_path_factory.mktemp("sidecar") / "model.pt"
    ck.write_bytes(Path(built["ck"]).read_bytes())
    m = fvlm.load(ck, device="cpu")
    return ck, m, m.embed_records([ShardDataset(built["shards"]).get("c0")])[0]


@pytest.mark.parametrize("kind, words", [
    ("null_hash", ["records no checkpoint sha256"]),
    ("missing_hash", ["records no checkpoint sha256"]),
    ("other_hash", ["another checkpoint"]),
    ("future_version", ["version 2 is not supported"]),
    ("nan_threshold", ["hepatic_steatosis", "not a finite number"]),
    ("inf_threshold", ["hepatic_steatosis", "not a finite number"]),
    ("string_threshold", ["must be a number"]),
    ("diagnoses_list", ["zeroshot.diagnoses"]),
])
def test_bad_thresholds_sidecar_is_refused(loaded, tmp_path, capsys, kind, words):
    from fvlm.eval.predict import thresholds_sidecar

    ck, m, emb = loaded
    doc = {"format": "fvlm-thresholds", "version": 1, "checkpoint": {"sha256": m.sha256()},
           "scoring": {"rule": "pairwise"}, "zeroshot": {"diagnoses": {"hepatic_steatosis": {"threshold": 0.3}}}}
    if kind == "null_hash":
        doc["checkpoint"]["sha256"] = None
    elif kind == "missing_hash":
        del doc["checkpoint"]
    elif kind == "other_hash":
        doc["checkpoint"]["sha256"] = "f" * 64
    elif kind == "future_version":
        doc["version"] = 2
    elif kind == "nan_threshold":
        doc["zeroshot"]["diagnoses"]["hepatic_steatosis"]["threshold"] = float("nan")
    elif kind == "inf_threshold":
        doc["zeroshot"]["diagnoses"]["hepatic_steatosis"]["threshold"] = float("inf")
    elif kind == "string_threshold":
        doc["zeroshot"]["diagnoses"]["hepatic_steatosis"]["threshold"] = "high"
    elif kind == "diagnoses_list":
        doc["zeroshot"]["diagnoses"] = [0.3]
    side = thresholds_sidecar(ck)
    side.write_text(json.dumps(doc))  # json writes NaN / Infinity
    try:
        with pytest.raises(FvlmError) as e:
            m.predict(emb)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
        assert main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "ex")]) == 2
        _one_line(capsys, "fvlm export: error:", *words)
        assert not (tmp_path / "ex").exists()
    finally:
        side.unlink()


def test_write_thresholds_refuses_results_without_a_hash(tmp_path):
    from fvlm.eval.predict import write_thresholds

    ck = tmp_path / "m.pt"
    ck.write_bytes(b"x")
    with pytest.raises(FvlmError, match="no checkpoint sha256"):
        write_thresholds(ck, {"checkpoint": {}, "zeroshot": {"diagnoses": {"a": {"threshold": 0.1}}}})
    assert list(tmp_path.iterdir()) == [ck]


# --------------------------------------------------------------------------- the API speaks like the CLI


def _api_calls(m, ck, emb):
    import numpy as np

    z = np.zeros((20, 20, 20), np.float32)
    return {
        "device_tpu9": (lambda: fvlm.load(ck, device="tpu9"), ["tpu9", "not a device name"]),
        "device_int": (lambda: fvlm.load(ck, device=3), ["device must be a name"]),
        "path_none": (lambda: fvlm.load(None), ["path must be"]),
        "batch_size_0": (lambda: fvlm.load(ck, device="cpu", batch_size=0), ["batch_size"]),
        "embed_none": (lambda: m.embed(None), ["image is None"]),
        "embed_bytes": (lambda: m.embed(b"scan.nii.gz"), ["bytes"]),
        "embed_object": (lambda: m.embed(object()), ["expected a NIfTI path"]),
        "all_nan": (lambda: m.embed(np.full((20, 20, 20), np.nan), mask=z, affine=np.eye(4)), ["NaN"]),
        "singular_affine": (lambda: m.embed(z, mask=z, affine=np.zeros((4, 4))), ["singular"]),
        "nan_affine": (lambda: m.embed(z, mask=z, affine=np.full((4, 4), np.nan)), ["non-finite"]),
        "zero_axis": (lambda: m.embed(np.zeros((0, 20, 20)), mask=np.zeros((0, 20, 20)), affine=np.eye(4)),
                      ["empty axis"]),
        "text_surrogate": (lambda: m.embed_text("the liver\ud800"), ["texts[0]", "surrogate"]),
        "text_none": (lambda: m.embed_text(None), ["texts is None"]),
        "text_bytes": (lambda: m.embed_text(b"liver"), ["bytes"]),
        "text_list_none": (lambda: m.embed_text(["a", None]), ["texts[1]"]),
        "text_anatomy": (lambda: m.embed_text("a", anatomy="brain"), ["unknown anatomy"]),
        "thresholds_list": (lambda: m.predict(emb, thresholds=[1, 2]), ["thresholds must be"]),
        "thresholds_plain_dict": (lambda: m.predict(emb, thresholds={"a": 1}), ["not a results.json"]),
        "records_none": (lambda: m.embed_records(None), ["records"]),
        "records_str": (lambda: m.embed_records([1]), ["records[0]"]),
        "int64_out_of_range": (lambda: m.embed(np.full((20, 20, 20), 2 ** 40, np.int64), mask=z, affine=np.eye(4)),
                               ["not CT intensities"]),
        "mask_fractional": (lambda: m.embed(z, mask=np.full((20, 20, 20), 0.5), affine=np.eye(4)), ["label ids"]),
        "complex_image": (lambda: m.embed(z.astype(complex), mask=z, affine=np.eye(4)), ["dtype complex128"]),
        "similarity_nan": (lambda: m.similarity(np.full(m.embed_dim, np.nan, np.float32), "a"), ["finite"]),
    }


API_KINDS = ["device_tpu9", "device_int", "path_none", "batch_size_0", "embed_none", "embed_bytes", "embed_object",
             "all_nan", "singular_affine", "nan_affine", "zero_axis", "text_surrogate", "text_none", "text_bytes",
             "text_list_none", "text_anatomy", "thresholds_list", "thresholds_plain_dict", "records_none",
             "records_str", "similarity_nan", "int64_out_of_range", "mask_fractional", "complex_image"]


@pytest.mark.parametrize("kind", API_KINDS)
def test_api_bad_arguments_raise_one_sentence_fvlm_errors(loaded, kind):
    ck, m, emb = loaded
    fn, words = _api_calls(m, ck, emb)[kind]
    with pytest.raises(FvlmError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("where, words", [
    ("volume_size", "must be positive integers"), ("img_size", "must be positive integers"),
    ("data_str", "meta.data must be a mapping"), ("window_str", "meta.data: config key 'window'"),
    ("window_reversed", "lo < hi"), ("data_unknown_key", "unknown config key"),
])
def test_model_folder_with_bad_input_options_is_refused(built, tmp_path, where, words):
    d = _copy_dir(built["out"], tmp_path / "m")
    edit = {"volume_size": lambda c: c["meta"]["data"].__setitem__("volume_size", [32, 0, 16]),
            "img_size": lambda c: c["config"]["image"].__setitem__("img_size", [32, 0, 16]),
            "data_str": lambda c: c["meta"].__setitem__("data", "x"),
            "window_str": lambda c: c["meta"]["data"].__setitem__("window", "x"),
            "window_reversed": lambda c: c["meta"]["data"].__setitem__("window", [350, -1150]),
            "data_unknown_key": lambda c: c["meta"]["data"].__setitem__("evil", 1)}[where]
    _edit_config(d, edit)
    with pytest.raises(FvlmError, match=words):
        fvlm.load(d, device="cpu")


# --------------------------------------------------------------------------- CT-RATE reports CSV


def _ctrate_tree(root: Path, header, rows) -> Path:
    import csv

    ds = root / "dataset"
    d = ds / "valid_fixed" / "valid_1" / "valid_1_a"
    d.mkdir(parents=True)
    (d / "valid_1_a_1.nii.gz").write_bytes(b"")
    (ds / "reports").mkdir()
    with open(ds / "reports" / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return ds


@pytest.mark.parametrize("header, missing", [
    (["VolumeName", "Impressions_EN"], "Findings_EN"),
    (["Volume", "Findings_EN", "Impressions_EN"], "VolumeName"),
    (["volumename", "findings_en", "Impressions_EN"], "VolumeName and Findings_EN"),
])
def test_ctrate_reports_csv_without_its_columns_is_one_line(tmp_path, capsys, header, missing):
    ds = _ctrate_tree(tmp_path, header, [["valid_1_a_1.nii.gz", "Normal.", "Normal."][:len(header)]])
    assert main(["preprocess", "--input", str(ds), "--out", str(tmp_path / "o"), "-q"]) == 2
    _one_line(capsys, "reports.csv", f"without the {missing} column")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.h5"))


def test_ctrate_duplicate_volume_rows(tmp_path, caplog):
    from preprocess.inputs import read_ctrate

    head = ["VolumeName", "Findings_EN", "Impressions_EN"]
    row = ["valid_1_a_1.nii.gz", "Cardiomegaly.", "Cardiomegaly."]
    ds = _ctrate_tree(tmp_path / "same", head, [row, row])
    specs = read_ctrate(ds)  # an identical repeat: kept once, with a warning
    assert [s.findings for s in specs] == ["Cardiomegaly."]
    assert "repeated identical" in caplog.text
    ds = _ctrate_tree(tmp_path / "differ", head, [row, ["valid_1_a_1.nii.gz", "Normal.", "Normal."]])
    with pytest.raises(FvlmError, match=r"reports.csv:3: a second, different report row for valid_1_a_1.nii.gz"):
        read_ctrate(ds)


# --------------------------------------------------------------------------- embed leaves no state behind


def test_embed_nosuch_split_leaves_nothing_and_the_corrected_command_runs(built, tmp_path, capsys):
    out = tmp_path / "e.parquet"
    argv = ["embed", "--checkpoint", str(built["ck"]), "--data", str(built["shards"]), "--out", str(out),
            "--device", "cpu", "-q"]
    assert main([*argv, "--split", "nosuch"]) == 2
    _one_line(capsys, "no cases in split 'nosuch'", "train, valid")
    assert list(tmp_path.iterdir()) == []
    assert main([*argv, "--split", "valid"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet"]


def test_embed_failure_before_any_part_leaves_nothing(built, tmp_path, capsys, monkeypatch):
    from fvlm.commands import embed as embed_cmd

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_cmd, "_embed_chunks", boom)
    out = tmp_path / "e.parquet"
    rc = main(["embed", "--checkpoint", str(built["ck"]), "--data", str(built["shards"]), "--out", str(out),
               "--device", "cpu", "-q"])
    assert rc == 130
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- temporary files


def test_temp_files_live_in_one_per_process_folder_removed_at_exit(tmp_path):
    import subprocess

    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    from fvlm.tempdir import PREFIX, _host

    stale = tmp_path / f"{PREFIX}{_host()}-{dead}"
    (stale / "vocab_x").mkdir(parents=True)
    legacy = tmp_path / "fvlm_vocab_old"
    legacy.mkdir()
    os.utime(legacy, (0, 0))
    young = tmp_path / "fvlm_vocab_young"  # maybe a live older fvlm: kept
    young.mkdir()
    code = ("from fvlm.encoders.text import TextEncoder; import os, tempfile; from pathlib import Path; "
            "t = TextEncoder.tiny_random(); t.encode(['the liver']); "
            "print(sorted(p.name for p in Path(tempfile.gettempdir()).iterdir()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    during = eval(r.stdout.strip().splitlines()[-1])
    assert stale.name not in during and legacy.name not in during and young.name in during
    assert [n for n in during if n.startswith(PREFIX)], during  # its own folder, while it ran
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("fvlm")) == [young.name]  # removed at exit


# --------------------------------------------------------------------------- signals always land


def test_a_swallowed_interrupt_is_raised_again():
    """Python drops an exception raised while a __del__ runs; the recorded signal is raised at the next check."""
    import gc
    import signal

    from preprocess import runner

    class Holder:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here; its KeyboardInterrupt is "ignored"
                pass

    with runner.interrupts():
        Holder()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            runner.check_interrupted()
    runner.check_interrupted()  # leaving the run forgets it


def _preprocess_proc(man, out):
    import subprocess

    cmd = [sys.executable, "-m", "fvlm.cli", "preprocess", "--manifest", str(man), "--out", str(out),
           "--config", "preprocess/small", "--set", "reports.labeler=false", "--set", "qc.num_cases=0",
           "--samples-per-shard", "2", "--num-workers", "2", "-q"]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)


def test_sigint_and_sigterm_land_at_any_point_under_load(ct_samples, tmp_path):
    """A busy process shares the cores; the signal is sent as the run begins (its lock taken, workers not
    yet started), while the first case runs, once cases are staged, and 0.3 s after it began. Every run exits 130 with no worker left, no lock and no half-written
    file; the next run then finishes every case."""
    import csv
    import signal
    import subprocess
    import time

    ids = [f"c{i:02d}" for i in range(16)]
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image", "mask"])
        for c in ids:
            w.writerow([c, ct_samples / "example_ct_sm.nii.gz", ct_samples / "example_seg.nii.gz"])
    out = tmp_path / "o"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def n_staged():
        d = out / ".state"
        return len(list(d.rglob("*.h5"))) if d.is_dir() else 0

    base = [0]

    def staged():  # a case staged by this run
        return locked() and n_staged() > base[0]

    def marker():
        d = out / ".state" / "running"
        return locked() and d.is_dir() and any(d.iterdir())

    def locked():  # the run has begun (before that, Python has not installed its handlers yet)
        return (out / ".preprocess.lock").exists()

    try:
        for sig, when in ((signal.SIGINT, locked), (signal.SIGTERM, marker), (signal.SIGINT, staged),
                          (signal.SIGTERM, lambda: locked() and time.sleep(0.3) is None)):
            base[0] = n_staged()
            p = _preprocess_proc(man, out)
            t0 = time.time()
            while not when():
                assert p.poll() is None, f"the run ended (exit {p.returncode}) before the signal: {p.stderr.read()}"
                assert time.time() - t0 < 120
                time.sleep(0.01)
            p.send_signal(sig)
            _, err = p.communicate(timeout=60)
            assert p.returncode == 130, (sig, err)
            assert "Traceback" not in err, err
            assert not (out / ".preprocess.lock").exists()
            tmps = [str(q.relative_to(out)) for q in out.rglob("*.tmp")] if out.exists() else []
            assert not tmps, (sig, tmps)
            assert not [q for q in (out / "shards").glob("*.h5") if q.stat().st_size == 0] if (out / "shards").is_dir() else True
    finally:
        busy.kill()
        busy.wait()
    p = _preprocess_proc(man, out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines() if x.strip()]
    assert sorted(r["case_id"] for r in rows) == ids


def test_a_bad_case_read_in_a_dataloader_worker_stays_one_line(built, tmp_path):
    """torch re-raises a worker's exception with the worker's traceback as its message; an FvlmError
    keeps its one line (pretrain's loader reads shards in workers)."""
    from torch.utils.data import DataLoader

    from fvlm.data.shards import ShardDataset
    from fvlm.errors import FormatError

    root = _bad_shards("no_volume", built["shards"], tmp_path)
    ds = ShardDataset(root)
    with pytest.raises(FormatError) as e:
        for _ in DataLoader(ds, num_workers=1, collate_fn=lambda b: b):
            pass
    assert str(e.value).endswith("case 'c0': volume/0 is missing"), str(e.value)


def test_int64_arrays_embed_like_int16(loaded):
    """numpy's default integer type (int64) is a valid image; NIfTI writers refuse it unless cast."""
    import nibabel as nib
    import numpy as np

    from fvlm.resources import samples_dir

    _, m, _ = loaded
    ct = nib.load(samples_dir() / "ct" / "example_ct_sm.nii.gz")
    seg = nib.load(samples_dir() / "ct" / "example_seg.nii.gz")
    hu, lab = np.asarray(ct.dataobj), np.asarray(seg.dataobj)
    a = m.embed(hu.astype(np.int16), mask=lab.astype(np.uint8), affine=ct.affine)
    b = m.embed(hu.astype(np.int64), mask=lab.astype(np.int64), affine=ct.affine)
    for k, v in a.as_dict().items():
        assert np.array_equal(v, b.as_dict()[k]), k


@pytest.mark.parametrize("loader", ["taxonomy", "anatomy"])
def test_taxonomy_and_anatomy_yaml_have_the_config_caps(tmp_path, loader):
    import time

    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(FvlmError, match="billion laughs"):
        if loader == "taxonomy":
            from fvlm.taxonomy import load_taxonomy

            load_taxonomy(str(p))
        else:
            from fvlm.anatomy import load_anatomy_set

            load_anatomy_set(str(p))
    assert time.perf_counter() - t0 < 5
