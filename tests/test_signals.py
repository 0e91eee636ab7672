"""Ctrl-C and SIGTERM stop `fvlm pretrain` (and `fvlm embed`) wherever they land, exit 130 and leave nothing half-written.

One tiny run is cut by signals at several points while another process keeps the cores busy: during
set-up (before the first step), during training (the running step finishes and is saved), and as
two Ctrl-Cs in a row to the whole process group, loader workers included (the second stops at once). After each: exit 130, no traceback, no ``.tmp`` file or partial checkpoint, and the
latest checkpoint complete. The run then resumes to the end and its weights equal an uninterrupted
run's, bit for bit.
"""
import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import subprocess_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = ("train.steps=8", "train.ckpt_every=4", "train.log_every=1", "train.tensorboard=false",
        "data.num_workers=1")


def _start(out: Path, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fvlm.cli", "pretrain", "--config", "train/tiny.yaml", "--out", str(out), "-q"]
    for s in SETS + sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)   # its own process group, like a terminal job


def _rows(out: Path) -> list[dict]:
    p = out / "metrics.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step")]


def _latest(out: Path) -> int | None:
    p = out / "checkpoints" / "latest_complete"
    return int(p.read_text().strip().split("_")[1]) if p.is_file() else None


def _assert_clean(out: Path, err: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "fvlm pretrain: interrupted", err[-2000:]
    left = [str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".partial")]
    assert not left, left
    ck = out / "checkpoints"
    for d in (ck.glob("step_*") if ck.is_dir() else []):
        assert (d / "trainer_state_rank0.json").is_file(), f"{d} is incomplete"
    if _latest(out) is not None:
        assert (ck / f"step_{_latest(out):08d}").is_dir()


@contextlib.contextmanager
def _busy_beside(reference: subprocess.Popen):
    """A process keeping one core busy for the block (the reference run is stopped if it fails)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    except BaseException:
        reference.kill()
        raise
    finally:
        busy.kill()
        busy.wait()


def _finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def _interrupt(p: subprocess.Popen, when, sig, group: bool, twice: bool) -> str:
    """Once ``when()`` holds, send ``sig`` to run ``p`` (to its whole process group, like a terminal's
    Ctrl-C, if ``group``; again 20 ms later if ``twice``); -> its stderr, after asserting exit 130."""
    t0 = time.time()
    while not when():
        assert p.poll() is None, f"the run ended (exit {p.returncode}) before the signal: {p.stderr.read()[-2000:]}"
        assert time.time() - t0 < 240
        time.sleep(0.005)
    send = (lambda s: os.killpg(p.pid, s)) if group else p.send_signal
    send(sig)
    if twice:
        time.sleep(0.02)
        if p.poll() is None:
            send(sig)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 130, (sig, p.returncode, err[-3000:])
    return err


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_signals_at_any_point_stop_pretrain_with_130_and_resume_exactly(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "cut"
    reference = _start(ref)   # the uninterrupted run, also load beside the busy loop
    with _busy_beside(reference):
        def setup_begun(before: int) -> bool:   # the log exists: model, DeepSpeed and data being set up
            return (out / "pretrain.log").is_file()

        def training(before: int) -> bool:        # this run finished a step
            return len(_rows(out)) > before

        # (signal, to the whole process group?, when, a second signal right after the first?)
        plan = [(signal.SIGINT, True, setup_begun, False),
                (signal.SIGTERM, False, training, False),
                (signal.SIGINT, True, training, True)]
        for sig, group, when, twice in plan:
            before = len(_rows(out))
            err = _interrupt(_start(out), lambda: when(before), sig, group, twice)
            _assert_clean(out, err)
            rows = _rows(out)
            if when is training and not twice:
                # the step that was running finished and was saved: nothing trained is lost
                assert _latest(out) == int(rows[-1]["step"]), (sig, _latest(out), rows[-1]["step"])
        assert _latest(out) is not None and _latest(out) < 8
    _finish(_start(out), reference)
    a, b = _weights(ref / "model.pt"), _weights(out / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_after_the_same_step_with_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to its 2 ranks; they agree on the step to stop after, both save
    their part of that checkpoint and exit 130."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "fvlm.train", "--config", "train/tiny.yaml", "--out", str(out)]
    for s in SETS + ("train.steps=30",):
        cmd += ["--set", s]
    p = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True)
    t0 = time.time()
    while len(_rows(out)) < 2:
        assert p.poll() is None, f"the run ended (exit {p.returncode}) before the signal: {p.stderr.read()[-3000:]}"
        assert time.time() - t0 < 240
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert err.count("fvlm.train: interrupted") == 2, err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    last = int(_rows(out)[-1]["step"])
    assert 2 <= last < 30 and _latest(out) == last
    tag = out / "checkpoints" / f"step_{last:08d}"
    assert (tag / "trainer_state_rank0.json").is_file() and (tag / "trainer_state_rank1.json").is_file()
    assert not list((out / "checkpoints").glob(".partial*"))


def _many_cases(src: Path, dst: Path, copies: int) -> None:
    """``copies`` x the 2 cases of ``src``'s one shard, as more shards with new case ids (an embed run
    long enough to be interrupted at several points)."""
    import json
    import shutil

    import h5py
    import hdf5plugin  # noqa: F401

    shutil.copytree(src, dst)
    rows = [json.loads(x) for x in (dst / "index.jsonl").read_text().splitlines() if x.strip()]
    first = dst / rows[0]["shard"]
    out = []
    for k in range(copies):
        name = f"shards/copy-{k:03d}.h5"
        shutil.copy(first, dst / name)
        with h5py.File(dst / name, "r+") as f:
            for r in rows:
                cid = f"k{k:03d}-{r['case_id']}"
                f["case_id"][r["row"]] = cid
                out.append(dict(r, case_id=cid, shard=name))
    first.unlink()
    (dst / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


def test_embed_signals_at_any_point_exit_130_and_the_rerun_finishes_every_case(tmp_path):
    """`fvlm embed` with one case per part: SIGTERM during set-up, Ctrl-C to the process group after a
    part, and two Ctrl-Cs in a row, under a busy core; each exit 130 with no .tmp, then the rerun
    writes every case once, equal to an uninterrupted run."""
    import numpy as np

    from api_helpers import make_checkpoint, make_shards

    shards = tmp_path / "many"
    _many_cases(make_shards(tmp_path), shards, 12)
    ck = make_checkpoint(tmp_path / "model.pt", shards)
    out, parts = tmp_path / "e.npz", tmp_path / "e.npz.parts"

    def start(o):
        cmd = [sys.executable, "-m", "fvlm.cli", "embed", "--checkpoint", str(ck), "--data", str(shards),
               "--out", str(o), "--chunk", "1", "--batch-size", "1", "-q"]
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, start_new_session=True)

    def n_parts():
        return len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0

    reference = start(tmp_path / "ref.npz")   # uninterrupted, and load beside the busy loop
    with _busy_beside(reference):
        plan = [(signal.SIGTERM, False, lambda b: parts.is_dir(), False),   # state written, nothing embedded
                (signal.SIGINT, True, lambda b: n_parts() > b, False),
                (signal.SIGINT, True, lambda b: n_parts() > b, True)]
        for sig, group, when, twice in plan:
            before = n_parts()
            err = _interrupt(start(out), lambda: when(before), sig, group, twice)
            assert "Traceback" not in err and err.strip().splitlines()[-1] == "fvlm embed: interrupted", err[-2000:]
            left = [q.name for q in tmp_path.rglob("*.tmp*")]
            assert not left, left
            assert not out.exists()
        assert 0 < n_parts() < 24
    _finish(start(out), reference)
    a, b = np.load(out), np.load(tmp_path / "ref.npz")
    # a stop between making the parts folder and writing its state (or while a finished run removed
    # it) leaves folders that hold nothing: the same command then runs, it is not refused
    again = tmp_path / "again.npz"
    (tmp_path / "again.npz.parts").mkdir()
    (tmp_path / "again.npz.parts.done" / "x").mkdir(parents=True)
    _finish(start(again))
    assert sorted(p.name for p in tmp_path.glob("again.npz*")) == ["again.npz"]
    assert sorted(a["case_id"]) == sorted(b["case_id"]) and len(set(a["case_id"])) == 24
    order_a, order_b = np.argsort(a["case_id"]), np.argsort(b["case_id"])
    for k in b.files:
        if k.startswith("emb_"):
            assert np.array_equal(a[k][order_a], b[k][order_b]), k

