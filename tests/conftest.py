"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once into the shared repo cache."""
    from gmt_align.quickstart import MODEL_DIRNAME, prepare_model

    return prepare_model(REPO_ROOT / ".cache" / "quickstart" / MODEL_DIRNAME)
