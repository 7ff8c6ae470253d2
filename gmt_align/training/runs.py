"""A run's folder: one run per ``output_dir``, resumed only from complete checkpoints with its own settings.

Checked before any model loads (``gmt-align sft|dpo`` and ``validate``) and again by the trainers:

- **A reused folder.** A new run (not resuming) refuses an ``output_dir`` that already holds a run
  (checkpoints, a saved model, ``gmt_stats.jsonl``) unless ``overwrite_output_dir: true``, which
  removes that run's checkpoints and stats first, so nothing of it can be resumed or reported later.
- **An incomplete checkpoint.** ``resume_from_checkpoint: true`` takes the newest *complete*
  checkpoint: its ``trainer_state.json`` (written last by the Trainer) parses. A checkpoint cut
  short by a kill while saving is passed over, with a warning naming it.
- **Other settings.** Every checkpoint carries the ``gmt_*`` settings it was trained with, inside
  ``trainer_state.json`` (``stateful_callbacks``: :class:`GMTRunRecord`). Resuming with a different
  ratio, granularity, mode, selection, exclude list or seed refuses, naming each difference,
  unless ``gmt_resume_changed_settings: true`` (then GMT's telemetry also starts afresh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .stats_file import STATS_FILE

__all__ = [
    "GMTRunRecord",
    "RunFolderError",
    "check_resume_settings",
    "clear_previous_run",
    "complete_checkpoint",
    "prepare_run_folder",
    "previous_run",
    "resolve_resume",
    "saved_record",
    "settings_of",
]

# What a command line's ``--resume_from_checkpoint`` may say instead of a path (a YAML `true` is a bool).
BOOLEAN_WORDS = ("true", "false", "yes", "no", "1", "0", "")
SETTINGS = ("gmt_mask_ratio", "gmt_granularity", "gmt_mode", "gmt_selection", "gmt_exclude", "gmt_seed")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_model.safetensors", "trainer_state.json", "training_args.bin")


class RunFolderError(ValueError):
    """An output folder or checkpoint that would mix two runs or resume a broken one (one line)."""


def settings_of(args) -> dict:
    """The settings that decide the masks; ``gmt_seed`` resolved as the engine resolves it."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    settings["gmt_exclude"] = list(settings["gmt_exclude"])
    if settings["gmt_seed"] is None:
        settings["gmt_seed"] = args.seed
    return settings


class GMTRunRecord(TrainerCallback, ExportableState):
    """Writes the run's GMT settings into every checkpoint's ``trainer_state.json``.

    ``ExportableState`` puts :meth:`state` into ``trainer_state.json``, the file the Trainer writes
    last, so a checkpoint holds its settings exactly when it is complete. Built from keywords only,
    as the Trainer rebuilds it with ``restore_callback_states_from_checkpoint``.
    """

    def __init__(self, settings: dict | None = None, world_size: int = 1, telemetry_files: bool | None = None):
        # ``telemetry_files`` is what checkpoints of the first release recorded; it is accepted so that
        # the Trainer can rebuild this callback from them, and no longer written or read.
        self.settings = dict(settings or {})
        self.world_size = world_size

    def on_train_begin(self, args, state, control, **kwargs):
        from gmt_align.core.distributed import world_size_of

        self.settings = settings_of(args)  # those of this run, also when rebuilt from a checkpoint
        self.world_size = world_size_of()

    def state(self) -> dict:
        return {"args": {"settings": self.settings, "world_size": self.world_size}, "attributes": {}}


def _checkpoints(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), path) for path in folder.iterdir() if path.is_dir() and (m := _CHECKPOINT.match(path.name))]
    return [path for _, path in sorted(found)]


def saved_record(checkpoint: str | os.PathLike) -> dict | None:
    """The :class:`GMTRunRecord` state of a checkpoint, ``{}`` if it has none, ``None`` if incomplete."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    record = (state.get("stateful_callbacks") or {}).get(GMTRunRecord.__name__)
    if isinstance(record, list):
        record = record[0] if record else None
    return dict((record or {}).get("args") or {})


def complete_checkpoint(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or ``None`` if it is complete: the Trainer writes
    ``trainer_state.json`` last, so a checkpoint cut short while saving has none (or a torn one). A
    rank's GMT telemetry file, written after it, only carries coverage: without it the run resumes
    and coverage starts afresh, with a warning (gmt_align.training.trainers.start_telemetry)."""
    return "no readable trainer_state.json (cut short while saving?)" if saved_record(checkpoint) is None else None


def resolve_resume(resume, output_dir: str) -> str | None:
    """``resume_from_checkpoint`` as a checkpoint path (or ``None``): ``true`` (also the command
    line's ``"true"``) means the newest complete checkpoint of ``output_dir``."""
    if isinstance(resume, str) and resume.strip().lower() in BOOLEAN_WORDS:
        resume = resume.strip().lower() in ("true", "yes", "1")
    if resume is False or resume is None:
        return None
    if resume is not True:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise RunFolderError(f"resume_from_checkpoint: no such checkpoint directory {resume}")
        why = complete_checkpoint(path)
        if why:
            raise RunFolderError(f"resume_from_checkpoint: {resume} is incomplete: {why}")
        return str(path)
    folder = Path(output_dir)
    candidates = _checkpoints(folder) if folder.is_dir() else []
    for checkpoint in reversed(candidates):
        why = complete_checkpoint(checkpoint)
        if why is None:
            return str(checkpoint)
        warnings.warn(f"gmt-align: passing over {checkpoint}: {why}; resuming from an earlier checkpoint",
                      stacklevel=2)
    raise RunFolderError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint "
                         f"({len(candidates)} incomplete)" if candidates else
                         f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N folder")


def check_resume_settings(checkpoint: str, args) -> list[str]:
    """The ``gmt_*`` settings that differ from those ``checkpoint`` was trained with (``key: old -> new``)."""
    record = saved_record(checkpoint) or {}
    saved = record.get("settings")
    if not saved:  # saved by a plain Trainer or an older gmt-align: nothing to compare with
        return []
    now = settings_of(args)
    return [f"{key}: {saved.get(key)!r} -> {now[key]!r}" for key in SETTINGS if saved.get(key) != now[key]]


def previous_run(output_dir: str) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run (empty if nothing does)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path.name for path in _checkpoints(folder)]
    found += [name for name in (STATS_FILE, *_MODEL_FILES) if (folder / name).exists()]
    return found


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove the checkpoints and stats of an earlier run in ``output_dir`` (``overwrite_output_dir``)."""
    folder = Path(output_dir)
    removed = []
    for path in [*_checkpoints(folder), folder / STATS_FILE]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path.name)
    return removed


def prepare_run_folder(args, first_on_node: bool) -> str | None:
    """Check ``output_dir`` and the checkpoint to resume from; returns that checkpoint (or ``None``).

    Raises :class:`RunFolderError` with one line. With ``overwrite_output_dir`` the first process
    of each node (``first_on_node``) removes the earlier run's checkpoints and stats.
    """
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume is not None:
        changed = check_resume_settings(resume, args)
        if changed and not args.gmt_resume_changed_settings:
            raise RunFolderError(
                f"{resume} was trained with other GMT settings ({'; '.join(changed)}); resume with the same "
                "settings, or pass --gmt_resume_changed_settings true to continue under the new ones"
            )
        return resume
    earlier = previous_run(args.output_dir)
    if earlier and not args.overwrite_output_dir:
        shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise RunFolderError(
            f"output_dir {args.output_dir} already holds a run ({shown}); resume it with "
            "--resume_from_checkpoint true, choose another output_dir, or pass --overwrite_output_dir true"
        )
    if earlier and first_on_node:
        clear_previous_run(args.output_dir)
    return None
