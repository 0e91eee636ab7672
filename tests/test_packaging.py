"""A non-editable install finds its configs and sample data, from any working directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_finds_configs_and_samples(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-compile", "--target", str(target), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # configs travel as real files inside the package, not as a link back to the checkout
    cfg_dir = target / "fvlm" / "configs"
    assert cfg_dir.is_dir() and not cfg_dir.is_symlink()
    code = (
        "import fvlm, preprocess, sys\n"
        "from fvlm.resources import configs_dir, samples_dir\n"
        f"assert fvlm.__file__.startswith({str(target)!r}), fvlm.__file__\n"
        f"assert preprocess.__file__.startswith({str(target)!r}), preprocess.__file__\n"
        "assert (samples_dir() / 'ct' / 'example_ct.nii.gz').is_file()\n"
        "assert (samples_dir() / 'ct' / 'LICENSE').is_file()\n"
        "assert any(configs_dir().rglob('*.yaml')), list(configs_dir().iterdir())\n"
        "print(configs_dir())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(target) in out.stdout


def test_preprocess_import_does_not_depend_on_cwd(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import preprocess, fvlm; print(preprocess.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == (REPO / "preprocess").resolve()
