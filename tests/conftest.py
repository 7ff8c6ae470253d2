"""Shared pytest fixtures."""

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every process of the suite (this one, the ranks, the launchers) sees this environment's tools first,
# as in an activated venv: torch builds JIT extensions with the first `ninja` on PATH, and two ninja
# versions (the venv's, a system one) would rebuild each other's builds, about 40 s each time.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _bind_library_loggers_to_the_real_streams():
    """transformers and DeepSpeed create their log handlers on first use, bound to the sys.stderr /
    sys.stdout of that moment. If that moment is inside a test that captures output (capsys), the
    handler keeps the captured stream, which pytest closes afterwards: every later log line then
    prints "--- Logging error ---" into whatever the next test reads. Create them now, on the real streams."""
    import deepspeed.utils.logging  # noqa: F401  (its logger is made at import)
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_verbosity()  # configures the library's root handler


_bind_library_loggers_to_the_real_streams()

REPO_ROOT = Path(__file__).resolve().parents[1]


# The slow tier: what starts real ranks, runs a documented launcher line, loads the real model, starts
# gmt-align as a process of its own, runs a benchmark, or builds the C++ kernels for another instruction
# set. `make test` runs everything; `make test-fast` (pytest -m "not slow") the rest: the core, in process.
SLOW_KINDS = ("multirank", "launcher", "real_model", "process", "benchmark", "build")


def pytest_collection_modifyitems(config, items):
    """A test that takes the real model (the smollm2_dir fixture, directly or through another
    fixture) is a real-model test; every test of a slow kind is slow."""
    for item in items:
        if "smollm2_dir" in item.fixturenames:
            item.add_marker(pytest.mark.real_model)
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session):
    """A killed build's lock in the shared extension cache makes every test that loads that extension
    (DeepSpeed's cpu_adam, its comm) wait forever: stop at once and say which folder to delete."""
    from gmt_align.core.build_lock import stale_lock_problems

    problems = stale_lock_problems()
    if problems:
        pytest.exit("; ".join(problems), returncode=2)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once into the shared repo cache."""
    from gmt_align.quickstart import MODEL_DIRNAME, prepare_model

    return prepare_model(REPO_ROOT / ".cache" / "quickstart" / MODEL_DIRNAME)


@pytest.fixture(scope="session")
def tiny_model() -> list[str]:
    """``--model_name_or_path`` of a random-weight SmolLM2 of 2 layers x 64 (its real tokenizer), made
    once in the shared cache: for the launcher, checkpoint and multi-node tests, where the real model
    is not the point (quickstart_runs.make_tiny_model)."""
    from gmt_align.quickstart import MODEL_DIRNAME, prepare_model
    from quickstart_runs import TINY_DIRNAME, make_tiny_model

    cache = REPO_ROOT / ".cache" / "quickstart"
    real = prepare_model(cache / MODEL_DIRNAME)
    return ["--model_name_or_path", str(make_tiny_model(real, cache / TINY_DIRNAME))]


@pytest.fixture(scope="session")
def zero2_reference(tiny_model, tmp_path_factory):
    """The 1-node, 2-process ZeRO-2 run that the multi-node and checkpoint tests compare with, started
    by the README's ``deepspeed --num_gpus 2`` line: two GMT steps of the tiny model, a DeepSpeed
    checkpoint after each. Shared: each such run costs tens of seconds on 2 cores."""
    from gmt_align.quickstart import prepare_quickstart
    from launchers import launch
    from quickstart_runs import SAVE_EACH_STEP, TWO_STEPS

    prepare_quickstart(REPO_ROOT / ".cache" / "quickstart")
    out = tmp_path_factory.mktemp("zero2_reference")
    (stdout,) = launch("deepspeed", out, *TWO_STEPS, *SAVE_EACH_STEP, *tiny_model)
    yield out, stdout
    shutil.rmtree(out, ignore_errors=True)
