"""Shared test setup: offline Hugging Face, few threads, sample data paths."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fvlm.resources import samples_dir  # noqa: E402


@pytest.fixture(scope="session")
def ct_samples() -> Path:
    return samples_dir() / "ct"


@pytest.fixture(scope="session")
def cxr_samples() -> Path:
    return samples_dir() / "cxr"
