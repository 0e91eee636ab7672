"""Ctrl-C and SIGTERM stop `fvlm pretrain` wherever they land, exit 130 and leave nothing half-written.

One tiny run is cut by signals at several points while another process keeps the cores busy: during
set-up (before the first step), during training (the running step finishes and is saved), as a
Ctrl-C to the whole process group (loader workers included), and twice in a row (the second stops
at once). After each: exit 130, no traceback, no ``.tmp`` file or partial checkpoint, and the
latest checkpoint complete. The run then resumes to the end and its weights equal an uninterrupted
run's, bit for bit.
"""
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


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_signals_at_any_point_stop_pretrain_with_130_and_resume_exactly(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "cut"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    reference = _start(ref)   # the uninterrupted run, also load beside the busy loop
    try:
        def setup_begun(before: int) -> bool:   # the log exists: model, DeepSpeed and data being set up
            return (out / "pretrain.log").is_file()

        def training(before: int) -> bool:        # this run finished a step
            return len(_rows(out)) > before

        # (signal, to the whole process group?, when, a second signal right after the first?)
        plan = [(signal.SIGINT, True, setup_begun, False),
                (signal.SIGTERM, False, training, False),
                (signal.SIGINT, True, training, False),
                (signal.SIGTERM, False, training, True)]
        for sig, group, when, twice in plan:
            before = len(_rows(out))
            p = _start(out)
            t0 = time.time()
            while not when(before):
                assert p.poll() is None, f"the run ended (exit {p.returncode}) before the signal: {p.stderr.read()[-2000:]}"
                assert time.time() - t0 < 240
                time.sleep(0.01)
            send = (lambda s: os.killpg(p.pid, s)) if group else p.send_signal
            send(sig)
            if twice:
                time.sleep(0.05)
                if p.poll() is None:
                    send(sig)
            _, err = p.communicate(timeout=180)
            assert p.returncode == 130, (sig, p.returncode, err[-3000:])
            _assert_clean(out, err)
            rows = _rows(out)
            if when is training and not twice:
                # the step that was running finished and was saved: nothing trained is lost
                assert _latest(out) == int(rows[-1]["step"]), (sig, _latest(out), rows[-1]["step"])
        assert _latest(out) is not None and _latest(out) < 8
    except BaseException:
        reference.kill()
        raise
    finally:
        busy.kill()
        busy.wait()
    for p in (_start(out), reference):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
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
