"""benchmarks/pretrain_bench.py --loss (two real gloo processes) and benchmarks/gpu_check.sh without CUDA."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench():
    """The benchmark as an importable module (spawned workers import it by name)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module("pretrain_bench")


def test_loss_bench_counts_the_collectives_of_both_losses_in_two_processes(capsys):
    bench = _bench()
    rows = bench.loss_bench(ks=(2, 5), batch=4, dim=16, reps=2, warmup=1)
    by = {(r["K"], r["loss"].split()[0]): r for r in rows}
    for k in (2, 5):
        old, new = by[(k, "per-name")], by[(k, "packed")]
        assert old["collectives_per_step"] == 4 * (k + 1) + 3      # four gathers per name + status, labels
        assert new["collectives_per_step"] == 1
        assert abs(old["total"] - new["total"]) < 1e-5             # the same loss on rank 0
        assert new["collective_ratio"] == old["collectives_per_step"]
        assert old["speedup_vs_per_name"] == 1.0 and new["ms_per_step"] > 0
    bench.print_loss_table(rows, 2, 4, 16)
    table = capsys.readouterr().out
    assert "| 5 | packed (now) | 1 |" in table and "at 8 GPUs" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_gpu_check_without_cuda_is_one_line_and_nonzero():
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip() and "accelerator" not in x]
    assert lines == ["gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing measured"]
    assert r.stdout == ""


def test_gpu_check_configs_build_vitb_under_zero2_and_zero3():
    """The two configurations the GPU check runs validate and name the intended ZeRO stages."""
    from fvlm.config import load_config
    from fvlm.ct.config import PretrainConfig

    bench = _bench()
    for name, stage in zip(bench.GPU_CHECK, ("zero2", "zero3")):
        args = bench.CONFIGS[name]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = load_config(PretrainConfig, [args[args.index("--config") + 1]], sets, base="train/default.yaml")
        assert cfg.model.image.encoder == "vit3d_base" and cfg.train.precision == "bf16"
        assert stage in str(cfg.train.deepspeed_config)
