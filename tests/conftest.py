"""Shared pytest fixtures."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once into the shared repo cache."""
    from gmt_align.quickstart import MODEL_DIRNAME, prepare_model

    return prepare_model(REPO_ROOT / ".cache" / "quickstart" / MODEL_DIRNAME)


@pytest.fixture(scope="session")
def zero2_reference(smollm2_dir, tmp_path_factory):
    """The 1-node, 2-process ZeRO-2 run that the multi-node and checkpoint tests compare with: two GMT
    steps, a DeepSpeed checkpoint after each. Shared: each such run costs about 30 s on 2 cores."""
    from gmt_align.quickstart import prepare_quickstart
    from quickstart_runs import SAVE_EACH_STEP, TWO_STEPS, run_recipe

    prepare_quickstart(REPO_ROOT / ".cache" / "quickstart")
    out = tmp_path_factory.mktemp("zero2_reference")
    stdout = run_recipe("sft", out, *TWO_STEPS, *SAVE_EACH_STEP, deepspeed="zero2", ranks=2)
    yield out, stdout
    shutil.rmtree(out, ignore_errors=True)  # about 6 GB of checkpoints
