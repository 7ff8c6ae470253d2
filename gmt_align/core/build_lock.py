"""Stale build locks in torch's extension folder: a refusal instead of a silent wait forever.

torch builds a JIT extension (GMT's C++ kernels, DeepSpeed's ``cpu_adam``, its shm comm) under a
``lock`` file in the extension's folder (``torch.utils.file_baton.FileBaton``), and every later
load of that extension — even one already built — waits, without a word and without a limit, until
the file is gone. A build that was killed (Ctrl-C, an OOM kill, a job's time limit) leaves the file
behind, and from then on every run hangs at start-up.

A real build keeps writing into its folder (``build.ninja``, objects, the module) and takes about a
minute or two here, so a lock is taken for stale when nothing in its folder changed for
:data:`QUIET_SECONDS`. ``gmt-align sft|dpo`` refuse such a lock before loading anything (it is a
machine problem, :func:`gmt_align.cli.environment.machine_problems`); the kernels' own loaders fall back
to their torch implementations with a warning instead of waiting.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .contract import Contract

__all__ = ["CONTRACT", "QUIET_SECONDS", "extension_folder", "extensions_root", "refuse_stale_lock", "stale_lock",
           "stale_lock_problems"]

CONTRACT = Contract(checked_with="torch 2.13", names=("torch.utils.cpp_extension:_get_build_directory",))

QUIET_SECONDS = 15 * 60  # builds take ~1.5 min here; a folder quiet this long holds no live build


def extension_folder(name: str = "") -> Path:
    """Where torch's JIT builds (and finds) the extension ``name``, under TORCH_EXTENSIONS_DIR if set;
    with no name, the root that holds every extension's folder."""
    from torch.utils.cpp_extension import _get_build_directory  # listed in CONTRACT

    return Path(_get_build_directory(name, verbose=False))


def extensions_root() -> Path:
    """torch's root for JIT extensions: TORCH_EXTENSIONS_DIR, else torch's per-Python default."""
    return extension_folder()


def stale_lock(folder: Path | str, now: float | None = None) -> str | None:
    """The problem with ``folder``'s lock, in one line, if a killed build left it; else None."""
    folder = Path(folder)
    lock = folder / "lock"
    try:
        newest = max(entry.stat().st_mtime for entry in [folder, *folder.iterdir()])
        lock.stat()
    except (OSError, ValueError):  # no lock (the usual case), or the folder went away meanwhile
        return None
    quiet = (time.time() if now is None else now) - newest
    if quiet < QUIET_SECONDS:
        return None
    return (f"{lock} was left {quiet / 60:.0f} min ago by a build that did not finish (a killed run?), and "
            f"every later load of that extension waits on it forever: delete the folder {folder} "
            "(it is rebuilt on the next run)")


def stale_lock_problems() -> list[str]:
    """One line per stale lock under torch's extension root (see the module docstring)."""
    root = extensions_root()
    try:
        folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
    except OSError:
        return []
    return [problem for problem in map(stale_lock, folders) if problem]


def refuse_stale_lock(folder: str) -> None:
    """Raise instead of letting torch wait forever on ``folder``'s stale lock (kernel loaders)."""
    problem = stale_lock(folder) if os.path.isdir(folder) else None
    if problem:
        raise RuntimeError(problem)
