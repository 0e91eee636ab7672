"""Resuming pretraining never runs pickled code, falls back past a bad latest checkpoint, and a
refused resume leaves the run directory byte for byte as it was (issue 18).

Each case starts from the same interrupted tiny run (6 steps planned, stopped after 4, checkpoints
at steps 2 and 4) and damages it; the resumed run must equal an uninterrupted 6-step run weight
for weight when it fell back to step 2.
"""
import builtins
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvlm.errors import FormatError
from fvlm.engine.checkpoint_io import check_files, make_engine_safe, safe_torch_load

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import subprocess_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = ("train.steps=6", "train.ckpt_every=2", "val.enabled=false", "train.log_every=1", "train.threads=1")


class _Payload:
    """Unpickling this creates ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _train(out, *sets):
    args = [sys.executable, "-m", "fvlm.train", "--config", "train/tiny.yaml", "--out", str(out)]
    for s in SETS + sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    r = _train(root / "ref")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _train(root / "stopped", "train.stop_after=4")
    assert r.returncode == 3, r.stderr[-2000:]     # interrupted on purpose (stop_after)
    ck = root / "stopped" / "checkpoints"
    assert (ck / "latest_complete").read_text().strip() == "step_00000004"
    assert (ck / "step_00000002").is_dir()
    return root


def _copy(runs, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs / "stopped", out)
    return out


def _plant(path: Path, marker: Path) -> None:
    path.unlink(missing_ok=True)
    torch.save({"state": _Payload(marker)}, path)


def _assert_equal_to_ref(runs, out):
    ref, got = _weights(runs / "ref" / "model.pt"), _weights(out / "model.pt")
    assert ref.keys() == got.keys()
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not bad, f"resumed weights differ from the uninterrupted run: {bad[:5]}"


@pytest.mark.parametrize("victim", ["trainer_state_rank0.pt", "mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_pickle_in_latest_checkpoint_never_runs_and_resume_falls_back(runs, tmp_path, victim):
    out = _copy(runs, tmp_path)
    marker = tmp_path / "PWNED"
    _plant(out / "checkpoints" / "step_00000004" / victim, marker)
    r = _train(out)
    assert not marker.exists(), "a pickle in the checkpoint ran"
    assert r.returncode == 0, r.stderr[-2000:]
    assert "falling back to step_00000002" in r.stderr
    assert "pickled code" in r.stderr
    assert "step_00000002 (step 2)" in (out / "pretrain.log").read_text()
    _assert_equal_to_ref(runs, out)


def test_truncated_latest_and_dangling_pointer_fall_back(runs, tmp_path):
    out = _copy(runs, tmp_path)
    f = out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = _train(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unreadable" in r.stderr and "falling back to step_00000002" in r.stderr
    _assert_equal_to_ref(runs, out)

    out2 = tmp_path / "dangling"
    shutil.copytree(runs / "stopped", out2)
    (out2 / "checkpoints" / "latest_complete").write_text("step_00000009")
    r = _train(out2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step_00000009" in r.stderr and "is missing" in r.stderr
    assert "step_00000004 (step 4)" in (out2 / "pretrain.log").read_text()
    _assert_equal_to_ref(runs, out2)


def test_no_usable_checkpoint_is_one_line_and_touches_nothing(runs, tmp_path):
    out = _copy(runs, tmp_path)
    marker = tmp_path / "PWNED"
    for tag in ("step_00000002", "step_00000004"):
        _plant(out / "checkpoints" / tag / "trainer_state_rank0.pt", marker)
    before = _tree(out)
    r = _train(out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert not marker.exists()
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("fvlm.train: error:")]
    assert len(err) == 1 and "no usable checkpoint" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert _tree(out) == before


def test_refused_resume_with_another_model_touches_nothing(runs, tmp_path):
    out = _copy(runs, tmp_path)
    before = _tree(out)
    r = _train(out, "model.embed_dim=48")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "does not match this run's model" in r.stderr and "Traceback" not in r.stderr
    assert _tree(out) == before                      # config.yaml and pretrain.log included


def test_deepspeed_loader_is_weights_only(tmp_path):
    """The loader DeepSpeed's own ``load_checkpoint`` calls refuses a crafted pickle."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class _Engine:
        checkpoint_engine = TorchCheckpointEngine()

    eng = _Engine()
    make_engine_safe(eng)
    marker = tmp_path / "PWNED"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    _plant(bad, marker)
    with pytest.raises(FormatError, match="pickled code"):
        eng.checkpoint_engine.load(str(bad), map_location="cpu")
    with pytest.raises(FormatError, match="pickled code"):
        safe_torch_load(bad)
    assert not marker.exists()
    assert "pickled code" in check_files(tmp_path)
