"""Shared test setup: offline Hugging Face, few threads, sample data paths."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one torch thread each (set before torch is
    # imported), since two 2-thread pools on 2 cores spin against each other (~5x slower steps)
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fvlm.resources import samples_dir  # noqa: E402


@pytest.fixture(scope="session")
def ct_samples() -> Path:
    return samples_dir() / "ct"


@pytest.fixture(scope="session")
def cxr_samples() -> Path:
    return samples_dir() / "cxr"
