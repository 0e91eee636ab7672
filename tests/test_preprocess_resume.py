"""`fvlm preprocess` re-runs: resume by case id, run lock, watched workers, Ctrl-C, refused re-runs."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvlm.cli import main
from fvlm.data import ShardDataset

FAST = ["--config", "preprocess/small", "--set", "reports.labeler=false", "--set", "qc.num_cases=0",
        "--samples-per-shard", "2", "-q"]


def _manifest(path, ct_samples, ids, findings=None):
    findings = findings or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image", "mask", "findings"])
        for c in ids:
            w.writerow([c, ct_samples / "example_ct_sm.nii.gz", ct_samples / "example_seg.nii.gz",
                        findings.get(c, f"case {c}")])
    return str(path)


def _index(out):
    return [json.loads(x) for x in (Path(out) / "index.jsonl").read_text().splitlines()]


def _tree(d):
    """Every file under ``d`` with its bytes (what a refused run must leave as it was)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(ct_samples, tmp_path_factory):
    """a, b, c preprocessed with 2 cases a shard (shards 000-00000: a,b; 000-00001: c)."""
    d = tmp_path_factory.mktemp("base")
    man = _manifest(d / "m.csv", ct_samples, ["a", "b", "c"])
    assert main(["preprocess", "--manifest", man, "--out", str(d / "o"), *FAST]) == 0
    return d / "o"


@pytest.fixture
def out(base, tmp_path):
    o = tmp_path / "o"
    shutil.copytree(base, o)
    return o


def _run(man, out, *extra):
    return main(["preprocess", "--manifest", man, "--out", str(out), *FAST, *extra])


def test_inserted_case_is_added_and_nothing_is_duplicated(ct_samples, out, tmp_path):
    before = _tree(out / "shards")
    man = _manifest(tmp_path / "m.csv", ct_samples, ["a", "x", "b", "c"])
    assert _run(man, out) == 0
    ids = [r["case_id"] for r in _index(out)]
    assert sorted(ids) == ["a", "b", "c", "x"]  # each exactly once
    s = json.loads((out / "summary.json").read_text())
    assert s["this_run"]["processed_ok"] == 1 and s["this_run"]["reused"] == 3
    after = _tree(out / "shards")
    assert all(after[k] == v for k, v in before.items())  # finished shards untouched
    ds = ShardDataset(out)
    assert ds.get("x").report["findings"] == "case x" and ds.get("b").report["findings"] == "case b"


def test_reordered_manifest_processes_nothing(ct_samples, out, tmp_path):
    man = _manifest(tmp_path / "m.csv", ct_samples, ["c", "b", "a"])
    assert _run(man, out) == 0
    assert sorted(r["case_id"] for r in _index(out)) == ["a", "b", "c"]
    assert json.loads((out / "summary.json").read_text())["this_run"]["processed_ok"] == 0


def test_removed_case_is_reported_stale_and_unindexed(ct_samples, out, tmp_path, capsys):
    man = _manifest(tmp_path / "m.csv", ct_samples, ["a", "c"])
    assert main(["preprocess", "--manifest", man, "--out", str(out), *FAST[:-1]]) == 0
    assert [r["case_id"] for r in _index(out)] == ["a", "c"]
    s = json.loads((out / "summary.json").read_text())
    assert s["this_run"]["stale"] == ["b"] and s["cases_ok"] == 2
    assert "no longer in the manifest" in capsys.readouterr().err
    with pytest.raises(Exception, match="not in"):
        ShardDataset(out).get("b")
    # and back again: processed once more, indexed once
    man = _manifest(tmp_path / "m2.csv", ct_samples, ["a", "b", "c"])
    assert _run(man, out) == 0
    assert sorted(r["case_id"] for r in _index(out)) == ["a", "b", "c"]


def test_changed_inputs_are_processed_again(ct_samples, out, tmp_path):
    man = _manifest(tmp_path / "m.csv", ct_samples, ["a", "b", "c"], findings={"b": "new text"})
    assert _run(man, out) == 0
    rows = {r["case_id"]: r for r in _index(out)}
    assert len(_index(out)) == 3 and rows["b"]["shard"] not in (rows["a"]["shard"], rows["c"]["shard"])
    s = json.loads((out / "summary.json").read_text())
    assert s["this_run"]["reprocessed_changed"] == ["b"] and s["this_run"]["processed_ok"] == 1
    assert ShardDataset(out).get("b").report["findings"] == "new text"


def test_refused_rerun_touches_nothing(ct_samples, out, base):
    before = _tree(out)
    man = str(base.parent / "m.csv")
    assert _run(man, out, "--set", "target_spacing_mm=[2,2,2]") == 2
    assert _tree(out) == before


def test_lock_names_the_running_run_and_stale_lock_is_taken_over(ct_samples, out, base, capsys, caplog):
    man = str(base.parent / "m.csv")
    lock = out / ".preprocess.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC"}))
    before = _tree(out)
    assert _run(man, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err and "2026-01-01" in err
    assert _tree(out) == before
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    assert main(["preprocess", "--manifest", man, "--out", str(out), *FAST[:-1]]) == 0
    assert "taking over" in caplog.text and f"pid {dead.pid}" in caplog.text and not lock.exists()


def _start(man, out, workers=2):
    cmd = [sys.executable, "-m", "fvlm.cli", "preprocess", "--manifest", man, "--out", str(out), *FAST,
           "--num-workers", str(workers)]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)


def _wait_marker(out, p, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        ms = list((out / ".state" / "running").glob("*")) if (out / ".state" / "running").is_dir() else []
        for m in ms:
            try:
                return m.name, int(m.read_text())
            except (OSError, ValueError):
                pass
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    raise AssertionError("no case started")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkilled_worker_fails_its_case_and_run_finishes(ct_samples, tmp_path):
    man = _manifest(tmp_path / "m.csv", ct_samples, ["a", "b", "c", "d"])
    out = tmp_path / "o"
    p = _start(man, out)
    _, pid = _wait_marker(out, p)
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=240)  # the old Pool hung here forever
    assert p.returncode == 0, err  # 1 of 4 failed <= max_error_fraction 0.5
    errs = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    # the killed case (normally `cid`; the next one if the worker had just moved on) fails, the others land
    assert len(errs) == 1 and "killed by signal 9" in errs[0]["reason"] and errs[0]["stage"] == "internal"
    assert sorted(r["case_id"] for r in _index(out)) == sorted({"a", "b", "c", "d"} - {errs[0]["case_id"]})


def _interrupt(p, out, sig):
    """Send ``sig`` while a worker holds a case and most cases are still to do.

    On a loaded machine the test itself can be descheduled between seeing a worker's marker and
    signalling; the run then finishes first and exits 0. The manifest has many cases and the marker
    must be one of the first cases, so the signal reliably lands mid-run; the assertion says which.
    """
    _, pid = _wait_marker(out, p)
    assert p.poll() is None, f"the run ended (exit {p.returncode}) before it could be interrupted"
    p.send_signal(sig)
    return pid


IDS = [f"c{i:02d}" for i in range(60)]  # enough that a signal sent at the first case lands mid-run


def test_sigint_stops_all_workers_exits_130_and_next_run_resumes(ct_samples, tmp_path):
    man = _manifest(tmp_path / "m.csv", ct_samples, IDS)
    out = tmp_path / "o"
    p = _start(man, out)
    pid = _interrupt(p, out, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fvlm preprocess: interrupted" and "Traceback" not in err
    time.sleep(0.5)
    assert not _alive(pid) and not (out / ".preprocess.lock").exists()
    p = _start(man, out)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert sorted(r["case_id"] for r in _index(out)) == IDS


def test_second_concurrent_run_exits_2_naming_the_first(ct_samples, tmp_path, capsys):
    man = _manifest(tmp_path / "m.csv", ct_samples, ["a", "b", "c"])
    out = tmp_path / "o"
    p = _start(man, out, workers=1)
    t0 = time.time()
    while not (out / ".preprocess.lock").exists():
        assert p.poll() is None and time.time() - t0 < 120
        time.sleep(0.02)
    p.send_signal(signal.SIGSTOP)  # hold the first run mid-job (it may be quick) while the second tries
    try:
        assert _run(man, out) == 2
    finally:
        p.send_signal(signal.SIGCONT)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {p.pid} on {socket.gethostname()}" in err
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err  # the first run was not disturbed
    assert sorted(r["case_id"] for r in _index(out)) == ["a", "b", "c"]


def test_sigterm_stops_like_ctrl_c(ct_samples, tmp_path):
    man = _manifest(tmp_path / "m.csv", ct_samples, IDS)
    out = tmp_path / "o"
    p = _start(man, out)
    pid = _interrupt(p, out, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    time.sleep(0.5)
    assert not _alive(pid) and not (out / ".preprocess.lock").exists()


def test_truncated_finished_shard_is_set_aside_and_rebuilt(ct_samples, out, base):
    shard = out / "shards" / "000-00000.h5"
    good = shard.read_bytes()
    shard.write_bytes(good[:5000])
    assert _run(str(base.parent / "m.csv"), out) == 0
    assert "000-00000.h5 cannot be read" in (out / "preprocess.log").read_text()
    assert (out / "shards" / "000-00000.h5.damaged").read_bytes() == good[:5000]  # kept, not deleted
    assert sorted(r["case_id"] for r in _index(out)) == ["a", "b", "c"]
    ds = ShardDataset(out)
    assert ds.get("a").report["findings"] == "case a" and ds.get("b").volume is not None
