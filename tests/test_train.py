"""End-to-end pretraining on CPU through DeepSpeed: the loss falls, SIGKILL + resume is exact,
checkpoints load, two processes run the same config."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fvlm.errors import ConfigError
from fvlm.models.checkpoint import load_consolidated

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import subprocess_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cmd(out, *sets, launcher=None):
    args = ["-m", "fvlm.train", "--config", "train/tiny.yaml", "--out", str(out), "--set", "train.log_every=1"]
    for s in sets:
        args += ["--set", s]
    if launcher == "deepspeed":  # the launcher appends --local_rank; on CPU --num_gpus sets the process count
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                str(30500 + os.getpid() % 1000), "--module"] + args[1:]
    return [sys.executable] + args


def _train(out, *sets, launcher=None, timeout=240):
    r = subprocess.run(_cmd(out, *sets, launcher=launcher), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out) -> dict[int, float]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


@pytest.mark.slow
def test_tiny_zero2_loss_falls_and_checkpoint_loads(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.steps=40", "train.zero_stage=2", "train.val_every=20", "train.val_metric=val/auc_mean")
    loss = _losses(out)
    first = sum(loss[s] for s in range(1, 6)) / 5
    last = sum(loss[s] for s in range(36, 41)) / 5
    assert last < first - 0.3, (first, last)
    for f in ("config.yaml", "pretrain.log", "metrics.csv", "validation.csv", "model.pt", "best.pt", "checkpoints/latest_complete"):
        assert (out / f).exists(), f
    assert list((out / "tb").glob("events.*"))
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for col in ("loss/lung", "loss/global", "temperature", "lr", "samples_per_s", "time/forward"):
        assert col in header
    model, meta = load_consolidated(out / "model.pt")
    assert meta["step"] == 40 and meta["data"]["anatomies"] == ["lung", "heart", "liver", "kidney"]
    obj = torch.load(out / "model.pt", weights_only=True)
    assert any(k.startswith("image_encoder.") for k in obj["state_dict"])


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_loss_curve_and_weights(tmp_path):
    sets = ("train.steps=16", "train.ckpt_every=4", "val.enabled=false")
    ref = tmp_path / "ref"
    _train(ref, *sets)
    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(out, *sets, "train.threads=1"), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest_complete"
    t0 = time.time()
    while time.time() - t0 < 180 and p.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "step_00000004":
            break
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(_losses(out))
    assert killed_at < 16
    _train(out, *sets)                       # train.resume: auto
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == list(range(1, 17))   # rows after the checkpoint were redone, not duplicated
    for s in range(1, 17):
        assert a[s] == b[s], (s, a[s], b[s])
    assert "resumed from" in (out / "pretrain.log").read_text()
    wa = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)   # weights, not only the curve


@pytest.mark.slow
def test_bf16_zero1(tmp_path):
    # two processes under torchrun: tests/test_exact_resume.py (ZeRO-3) and tests/test_signals.py
    out = tmp_path / "bf16"
    _train(out, "train.steps=3", "train.precision=bf16", "train.zero_stage=1", "val.enabled=false")
    model, meta = load_consolidated(out / "model.pt")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_processes(tmp_path):
    out = tmp_path / "ds"
    _train(out, "train.steps=4", "train.zero_stage=2", "val.enabled=false", launcher="deepspeed")
    assert max(_losses(out)) == 4
    assert "2 process(es)" in (out / "pretrain.log").read_text()
    assert (out / "checkpoints" / "step_00000004" / "trainer_state_rank1.pt").is_file()
    model, _ = load_consolidated(out / "model.pt")
    assert model.anatomies


def test_deepspeed_config_from_train_config():
    from fvlm.engine.trainer import TrainConfig, deepspeed_config

    ds = deepspeed_config(TrainConfig(grad_accum=3, clip_grad=0.5, precision="bf16", zero_stage=1), 4, 2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config(TrainConfig(deepspeed_config="nope.json"), 1, 1)
    with pytest.raises(ConfigError, match="zero_stage"):
        deepspeed_config(TrainConfig(zero_stage=5), 1, 1)


def test_schedule_and_param_groups():
    from fvlm.engine.trainer import TrainConfig, build_param_groups, cosine_with_warmup

    f = cosine_with_warmup(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    m = torch.nn.ModuleDict({"enc": torch.nn.Linear(3, 3), "head": torch.nn.Linear(3, 3)})
    groups = build_param_groups(m, TrainConfig(lr=1.0, lr_groups={"enc.": 0.1}))
    lrs = sorted((g["lr"], g["weight_decay"] > 0, len(g["params"])) for g in groups)
    assert lrs == [(0.1, False, 1), (0.1, True, 1), (1.0, False, 1), (1.0, True, 1)]


def test_cli_config_errors(tmp_path):
    from fvlm.cli import main

    assert main(["pretrain", "--out", str(tmp_path), "--set", "loss.calibraton=[normal]"]) == 2
    assert main(["pretrain", "--out", str(tmp_path), "--set", "data.shards=/nonexistent"]) == 2
