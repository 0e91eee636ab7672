"""Resume is exact where it matters (weights, best.pt, validation scores), under ZeRO 0/2/3 and
fp32/bf16, and a 2-rank ZeRO-3 run with validation finishes, writes full-shape weights and
resumes exactly."""
import csv
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvlm.models.checkpoint import load_consolidated

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import subprocess_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = ("train.steps=6", "train.ckpt_every=3", "train.val_every=2", "train.val_metric=val/recall@1_mean",
        "val.max_cases=8", "train.log_every=1")


def _run(out, *sets, nproc=1):
    args = ["-m", "fvlm.train", "--config", "train/tiny.yaml", "--out", str(out)]
    for s in SETS + sets:
        args += ["--set", s]
    cmd = [sys.executable] + args
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port())] + args
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _validation(out):
    with open(Path(out) / "validation.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.slow
# ZeRO 0 / fp32 resume is checked bitwise in tests/test_signals.py (after signals) and
# tests/test_train.py (after SIGKILL); here the sharded optimizer states and bf16
@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp32")])
def test_stop_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, stage, precision):
    sets = (f"train.zero_stage={stage}", f"train.precision={precision}")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = _run(ref, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(cut, *sets, "train.stop_after=3")
    assert r.returncode == 3, r.stderr[-3000:]        # stopped on purpose, with a checkpoint at step 3
    r = _run(cut, *sets)                               # train.resume: auto
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (cut / "pretrain.log").read_text()
    for f in ("model.pt", "best.pt"):
        _assert_same_weights(_weights(ref / f), _weights(cut / f))
    assert _validation(ref) == _validation(cut) and len(_validation(ref)) == 3   # steps 2, 4, 6
    best = _weights(ref / "best.pt")
    assert all(v.dtype == torch.float32 for v in best.values() if v.is_floating_point())
    if precision == "bf16":   # fp32 master weights, not the bf16 copies the forward ran with
        w = best["image_encoder.patch_embed.proj.weight"] if "image_encoder.patch_embed.proj.weight" in best else \
            next(v for k, v in best.items() if k.startswith("image_encoder.") and v.ndim >= 2)
        assert not torch.equal(w, w.to(torch.bfloat16).float())


@pytest.mark.slow
def test_two_rank_zero3_with_validation_finishes_resumes_exactly_and_writes_full_weights(tmp_path):
    out = tmp_path / "z3"
    r = _run(out, "train.zero_stage=3", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "pretrain.log").read_text()
    assert "2 process(es)" in log and "new best val/recall@1_mean" in log
    assert len(_validation(out)) == 3
    for f in ("model.pt", "best.pt"):
        model, _ = load_consolidated(out / f)      # builds the model from the config: shapes must match
        full = {k: v.shape for k, v in model.state_dict().items()}
        w = _weights(out / f)
        assert {k: v.shape for k, v in w.items()} == full, f       # gathered, not 0-element partitions
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
        assert sum(v.numel() for v in w.values()) > 100_000
    assert (out / "checkpoints" / "step_00000006" / "trainer_state_rank1.pt").is_file()
    # stopped after step 3 with 2 ranks and resumed: the same weights, best.pt and validation history
    cut = tmp_path / "z3cut"
    r = _run(cut, "train.zero_stage=3", "train.stop_after=3", nproc=2)
    assert r.returncode != 0 and "exitcode: 3" in r.stderr, r.stderr[-3000:]   # torchrun turns a worker's 3 into 1
    r = _run(cut, "train.zero_stage=3", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (cut / "pretrain.log").read_text()
    for f in ("model.pt", "best.pt"):
        _assert_same_weights(_weights(out / f), _weights(cut / f))
    assert _validation(out) == _validation(cut)
