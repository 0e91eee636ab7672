"""A catalogue of bad inputs and faults: each gives its exit code, one line on stderr, and loses nothing.

Exit codes (README, "Exit codes"): 0 done, 2 bad input / usage / environment, 3 too many
cases failed (or none landed), 130 interrupted, 1 a bug. The run-loop faults with real
processes (killed worker, Ctrl-C, concurrent runs, refused re-runs) are in
tests/test_preprocess_resume.py.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import one_line as _one_line
from fvlm import cli
from fvlm.cli import main

FAST = ["--config", "preprocess/small", "--set", "reports.labeler=false", "--set", "qc.num_cases=0", "-q"]


def _manifest(path, ct_samples, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image", "mask"])
        for cid, image in rows:
            w.writerow([cid, image, ct_samples / "example_seg.nii.gz"])
    return str(path)


def _good(ct_samples):
    return str(ct_samples / "example_ct_sm.nii.gz")


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done(ct_samples, tmp_path_factory):
    """A finished one-case output directory and its manifest."""
    d = tmp_path_factory.mktemp("done")
    man = _manifest(d / "m.csv", ct_samples, [("a", _good(ct_samples))])
    assert main(["preprocess", "--manifest", man, "--out", str(d / "o"), *FAST]) == 0
    return man, d / "o"


# --------------------------------------------------------------------------- exit 2 for every command


@pytest.mark.parametrize("argv, words", [
    (["config", "show", "nonexist"], ["no config named"]),
    (["preprocess", "--manifest", "{t}/none.csv", "--out", "{t}/o"], ["manifest not found"]),
    (["reports", "label", "--in", "{t}/none.jsonl", "--out", "{t}/l.jsonl"], ["input not found"]),
    (["pretrain", "--data", "{t}/none", "--out", "{t}/pt", "--steps", "1"], ["not a directory"]),
    (["zeroshot", "--checkpoint", "{t}/none.pt", "--data", "{t}/none", "--out", "{t}/zs"], ["checkpoint not found"]),
    (["compare", "{t}/a.json", "{t}/b.json"], ["no such results file"]),
    (["predict", "--checkpoint", "{t}/none.pt", "--image", "{t}/none.nii.gz"], ["no such file"]),
    (["embed", "--checkpoint", "{t}/none.pt", "--data", "{t}/none", "--out", "{t}/e.parquet"], ["no such file"]),
    (["export", "--checkpoint", "{t}/none.pt", "--out", "{t}/ex"], ["no such file"]),
    (["pretrain-xray", "--data", "{t}/none", "--out", "{t}/px", "--steps", "1"], ["not found"]),
    (["dense", "eval", "--checkpoint", "{t}/none.pt"], ["not found"]),
    (["demo", "--out", "{t}/afile", "--generate-only"], ["already exists"]),
])
def test_every_command_bad_input_is_one_line_exit_2(argv, words, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    assert main([a.format(t=tmp_path) for a in argv]) == 2
    _one_line(capsys, f"fvlm {argv[0]}: error:", *words)
    assert (tmp_path / "afile").read_text() == "keep me"
    # nothing written but, for pretrain, pretrain-xray and dense eval, a new output folder holding the run's
    # log (pretrain-xray: and its config.yaml); they open it before checking their inputs (owned elsewhere)
    made = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "afile"]
    assert all(p.suffix == ".log" or (argv[0] == "pretrain-xray" and p.name == "config.yaml") for p in made), made


def test_info_exits_0(capsys):
    assert main(["info", "--json"]) == 0


# --------------------------------------------------------------------------- the CLI safety net


@pytest.mark.parametrize("exc, code, words", [
    (FileExistsError(17, "File exists", "/x/out"), 2, ["already exists: /x/out"]),
    (OSError(30, "Read-only file system", "/ro/out"), 2, ["read-only file system: /ro/out"]),
    (OSError(28, "No space left on device", "/full/x"), 2, ["no space left on device: /full/x"]),
    (PermissionError(13, "Permission denied", "/p/m.csv"), 2, ["permission denied: /p/m.csv"]),
    (b"\xff".decode("utf-8", "strict") if False else UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid"), 2,
     ["not UTF-8", "byte 2"]),
    (KeyError("anatomy"), 1, ["internal error (a bug", "KeyError", "--debug"]),
])
def test_safety_net(exc, code, words, monkeypatch, capsys):
    mod = cli.available_commands()["compare"]

    def boom(args):
        raise exc

    monkeypatch.setattr(mod, "run", boom)
    assert main(["compare", "a", "b"]) == code
    _one_line(capsys, "fvlm compare:", *words)
    with pytest.raises(type(exc)):  # --debug: the real traceback
        main(["--debug", "compare", "a", "b"])
    with pytest.raises(type(exc)):
        main(["compare", "a", "b", "--debug"])


# --------------------------------------------------------------------------- preprocess: inputs


def test_manifest_not_utf8(tmp_path, capsys):
    (tmp_path / "m.csv").write_bytes(b"case_id,image\na,x.nii.gz\nb\xe9,y.nii.gz\n")
    assert main(["preprocess", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "m.csv:3", "not UTF-8")
    assert not (tmp_path / "o").exists()


def test_manifest_jsonl_not_utf8(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_bytes(b'{"case_id": "a", "image": "\xff.nii"}\n')
    assert main(["preprocess", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "m.jsonl:1", "not UTF-8")


def test_manifest_unreadable(tmp_path, capsys, monkeypatch):
    (tmp_path / "m.csv").write_text("case_id,image\na,x\n")
    real = Path.read_bytes

    def denied(self):  # root ignores chmod 000, so the refusal is simulated
        if self.name == "m.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["preprocess", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "permission denied")


def test_manifest_is_a_directory(tmp_path, capsys):
    assert main(["preprocess", "--manifest", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "is a directory", "--input")


def test_manifest_row_with_extra_fields_names_the_line(tmp_path, capsys, ct_samples):
    good = _good(ct_samples)
    (tmp_path / "m.csv").write_text(f"case_id,image,findings\na,{good},fine\nb,{good},liver, spleen normal\n")
    assert main(["preprocess", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "m.csv:3", "4 fields but the header has 3")
    assert not (tmp_path / "o").exists()


def test_malformed_configs(tmp_path, capsys, ct_samples):
    man = _manifest(tmp_path / "m.csv", ct_samples, [("a", _good(ct_samples))])
    (tmp_path / "bad.yaml").write_text("shards: [unclosed\n")
    (tmp_path / "latin1.yaml").write_bytes(b"anatomy_set: f\xe9vlm15\n")
    for extra, word in ((["--config", str(tmp_path / "bad.yaml")], "bad.yaml"),
                        (["--config", str(tmp_path / "latin1.yaml")], "UTF-8"),
                        (["--config", str(tmp_path / "none.yaml")], "none.yaml"),
                        (["--set", "shards.samples_per_shrd=3"], "samples_per_shard"),
                        (["--set", "max_error_fraction=1.5"], "max_error_fraction")):
        assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *extra]) == 2, extra
        _one_line(capsys, word)
    assert not (tmp_path / "o").exists()


def test_out_is_an_existing_file(tmp_path, capsys, ct_samples):
    man = _manifest(tmp_path / "m.csv", ct_samples, [("a", _good(ct_samples))])
    (tmp_path / "o").write_text("precious")
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *FAST]) == 2
    _one_line(capsys, "is a file")
    assert (tmp_path / "o").read_text() == "precious"


def _mount_tmpfs(d: Path, opts: str):
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


def test_read_only_output(tmp_path, capsys, ct_samples, done):
    man, _ = done
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=64k")
    try:
        assert main(["preprocess", "--manifest", man, "--out", str(ro / "o"), *FAST]) == 2
        _one_line(capsys, "read-only file system", str(ro / "o"))
    finally:
        subprocess.run(["umount", str(ro)])


def test_disk_full_simulated_stops_the_run_keeping_finished_cases(tmp_path, capsys, ct_samples, done, monkeypatch):
    import preprocess.pipeline as pl

    man, base = done
    out = tmp_path / "o"
    import shutil
    shutil.copytree(base, out)
    before = _tree(out / "shards")
    man2 = _manifest(tmp_path / "m.csv", ct_samples, [("a", _good(ct_samples)), ("b", _good(ct_samples))])

    def full(*a, **k):  # what h5py raises on ENOSPC
        raise RuntimeError("Can't decrement id ref count (file write failed: time = Fri Dec  4, filename = 'x.h5', "
                           "file descriptor = 5, errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(pl, "write_shard", full)
    assert main(["preprocess", "--manifest", man2, "--out", str(out), *FAST]) == 2
    _one_line(capsys, "no space left on device", "run the same command again")
    assert _tree(out / "shards") == before and not (out / ".preprocess.lock").exists()
    monkeypatch.undo()
    assert main(["preprocess", "--manifest", man2, "--out", str(out), *FAST]) == 0
    assert len((out / "index.jsonl").read_text().splitlines()) == 2


def test_disk_full_real_tmpfs_no_segfault(tmp_path, ct_samples, done):
    man, _ = done
    full = tmp_path / "full"
    _mount_tmpfs(full, "size=200k")
    try:
        r = subprocess.run([sys.executable, "-m", "fvlm.cli", "preprocess", "--manifest", man, "--out",
                            str(full / "o"), *FAST], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 2, (r.returncode, r.stderr)  # was 139 (segfault) after a RuntimeError traceback
        lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("WARNING")]
        assert len(lines) == 1 and "no space left on device" in lines[0], r.stderr
    finally:
        subprocess.run(["umount", str(full)])


# --------------------------------------------------------------------------- preprocess: exit 3


def _bad_image(tmp_path):
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(2000))
    return str(p)


@pytest.mark.parametrize("n_bad, extra, code", [(3, [], 3), (2, [], 3), (1, [], 0),
                                                 (1, ["--set", "max_error_fraction=0"], 3)])
def test_failed_fraction_exit_codes(n_bad, extra, code, tmp_path, capsys, ct_samples):
    bad = _bad_image(tmp_path)
    rows = [(f"c{i}", bad if i < n_bad else _good(ct_samples)) for i in range(3)]
    man = _manifest(tmp_path / "m.csv", ct_samples, rows)
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *FAST, *extra]) == code
    err = capsys.readouterr().err
    errs = (tmp_path / "o" / "errors.jsonl").read_text().splitlines()
    assert len(errs) == n_bad and len((tmp_path / "o" / "index.jsonl").read_text().splitlines()) == 3 - n_bad
    if code == 3:
        assert ("no case was written" if n_bad == 3 else "max_error_fraction") in err
        assert "errors.jsonl" in err


# --------------------------------------------------------------------------- reports label


def test_reports_label_out_is_a_directory_checked_first(tmp_path, capsys, monkeypatch):
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "a", "text": "The liver is normal."}) + "\n")
    import fvlm.commands.reports as rep

    monkeypatch.setattr(rep, "make_labeler", lambda cfg: pytest.fail("labelled before checking --out"))
    assert main(["reports", "label", "--in", str(tmp_path / "r.jsonl"), "--out", str(tmp_path)]) == 2
    _one_line(capsys, "is a directory")


def test_reports_label_missing_input_leaves_no_tmp(tmp_path, capsys):
    (tmp_path / "l.jsonl").write_text("old labels\n")
    assert main(["reports", "label", "--in", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "l.jsonl")]) == 2
    _one_line(capsys, "input not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.jsonl"]
    assert (tmp_path / "l.jsonl").read_text() == "old labels\n"


def test_reports_label_interrupted_keeps_old_output(tmp_path, capsys, monkeypatch):
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "a", "text": "The liver is normal."}) + "\n")
    (tmp_path / "l.jsonl").write_text("old labels\n")
    import fvlm.commands.reports as rep

    class Stop:
        def label(self, **kw):
            raise KeyboardInterrupt

    monkeypatch.setattr(rep, "make_labeler", lambda cfg: Stop())
    assert main(["reports", "label", "--in", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "l.jsonl")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.jsonl", "r.jsonl"]
    assert (tmp_path / "l.jsonl").read_text() == "old labels\n"


def test_reports_label_only_error_records_exits_3(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_bytes(b"not json\n\xff\xfe\n")
    assert main(["reports", "label", "--in", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "l.jsonl")]) == 3
    assert "no report could be labelled" in capsys.readouterr().err
    assert len((tmp_path / "l.jsonl").read_text().splitlines()) == 2  # the error records are kept


# --------------------------------------------------------------------------- compare


def _results(path, diagnoses):
    doc = {"format": "fvlm-zeroshot-results", "version": 1,
           "zeroshot": {"diagnoses": diagnoses, "macro": {"overall": {"auc": {"value": 0.7}}}}}
    path.write_text(json.dumps(doc))
    return str(path)


def _results_format():
    from fvlm.eval.report import RESULTS_FORMAT, RESULTS_VERSION

    return RESULTS_FORMAT, RESULTS_VERSION


@pytest.fixture
def good_results(tmp_path):
    fmt, ver = _results_format()
    p = tmp_path / "good.json"
    p.write_text(json.dumps({"format": fmt, "version": ver, "zeroshot": {
        "diagnoses": {"d1": {"anatomy": "liver", "auc": {"value": 0.8}}},
        "macro": {"overall": {"auc": {"value": 0.8}}}}}))
    return str(p)


def test_compare_good_pair_works(good_results, capsys):
    assert main(["compare", good_results, good_results]) == 0
    assert "d1 (liver)" in capsys.readouterr().out


def test_compare_non_utf8_results(tmp_path, good_results, capsys):
    (tmp_path / "bad.json").write_bytes(b'{"format": "\xff"}')
    assert main(["compare", good_results, str(tmp_path / "bad.json")]) == 2
    _one_line(capsys, "bad.json", "not UTF-8")


def test_compare_diagnosis_without_anatomy(tmp_path, good_results, capsys):
    fmt, ver = _results_format()
    doc = json.loads(Path(good_results).read_text())
    del doc["zeroshot"]["diagnoses"]["d1"]["anatomy"]
    (tmp_path / "noanat.json").write_text(json.dumps(doc))
    assert main(["compare", good_results, str(tmp_path / "noanat.json")]) == 2
    _one_line(capsys, "noanat.json", "'d1'", "anatomy")


def test_compare_truncated_and_wrong_format(tmp_path, good_results, capsys):
    (tmp_path / "trunc.json").write_text(Path(good_results).read_text()[:40])
    assert main(["compare", good_results, str(tmp_path / "trunc.json")]) == 2
    _one_line(capsys, "trunc.json", "not valid JSON")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    assert main(["compare", good_results, str(tmp_path / "other.json")]) == 2
    _one_line(capsys, "other.json")


# --------------------------------------------------------------------------- checkpoints (fixes landed elsewhere)


@pytest.mark.parametrize("cmd", [
    ["zeroshot", "--data", "{t}", "--out", "{t}/zs"],
    ["predict", "--image", "{t}/none.nii.gz"],
    ["export", "--out", "{t}/ex"],
])
@pytest.mark.parametrize("kind", ["empty", "pickle", "truncated"])
def test_bad_checkpoint_is_one_line_and_never_unpickled(cmd, kind, tmp_path, capsys):
    import pickle

    import torch

    ck = tmp_path / "model.pt"
    marker = tmp_path / "PWNED"
    if kind == "empty":
        ck.write_bytes(b"")
    elif kind == "pickle":  # a crafted pickle whose load would create `marker`
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"model": Payload()}, ck, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    else:
        torch.save({"model": {"w": torch.zeros(64, 64)}}, ck)
        ck.write_bytes(ck.read_bytes()[:300])
    rc = main([cmd[0], "--checkpoint", str(ck), *[a.format(t=tmp_path) for a in cmd[1:]]])
    assert rc == 2
    _one_line(capsys, f"fvlm {cmd[0]}: error:")
    assert not marker.exists()


# --------------------------------------------------------------------------- --out of zeroshot / predict


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from api_helpers import make_checkpoint, make_shards

    d = tmp_path_factory.mktemp("tiny")
    shards = make_shards(d)
    return make_checkpoint(d / "model.pt", shards), shards


def test_zeroshot_out_is_a_file(tiny_model, tmp_path, capsys):
    ck, shards = tiny_model
    (tmp_path / "afile").write_text("keep")
    assert main(["zeroshot", "--checkpoint", str(ck), "--data", str(shards), "--out", str(tmp_path / "afile"),
                 "-q"]) == 2
    _one_line(capsys, "already exists", "afile")
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("out, words", [("{t}", ["is a directory"]), ("{t}/afile/p.json", ["afile is a file"])])
def test_predict_out_checked_before_the_model_runs(tiny_model, tmp_path, capsys, monkeypatch, out, words):
    from fvlm.eval import loading

    ck, _ = tiny_model
    (tmp_path / "afile").write_text("keep")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded before --out was checked"))
    assert main(["predict", "--checkpoint", str(ck), "--image", str(ck), "--out", out.format(t=tmp_path)]) == 2
    _one_line(capsys, *words)
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name)) == [tmp_path.name]
    assert (tmp_path / "afile").read_text() == "keep"


def test_dense_eval_with_a_missing_checkpoint_writes_nothing(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["dense", "eval", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == 2
    _one_line(capsys, "none.pt")
    assert not out.exists()
