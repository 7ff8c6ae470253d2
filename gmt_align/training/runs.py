"""A run's folder: one run per ``output_dir``, resumed only from complete checkpoints with its own settings.

Checked before any model loads (``gmt-align sft|dpo|grpo`` and ``validate``) and again by the trainers:

- **A reused folder.** A new run (not resuming) refuses an ``output_dir`` that already holds a run
  (checkpoints, a saved model, ``gmt_stats.jsonl``) unless ``overwrite_output_dir: true``, which
  removes everything that run wrote there first (checkpoints, stats, model, tokenizer, model card,
  TensorBoard logs, report figures: :data:`RUN_FILES`), so nothing of it mixes into the new run; a
  file gmt-align does not know is kept and named. (Two *live* runs: :mod:`gmt_align.training.run_lock`.)
- **Temporaries of a killed save.** safetensors writes each file as ``.tmpXXXXXX`` and renames it; a
  kill while saving leaves that file (as large as the model) in the checkpoint, and gmt-align's own
  ``*.partial`` files likewise. The run that next holds the folder removes them first, in one line.
- **An incomplete checkpoint.** ``resume_from_checkpoint: true`` takes the newest *complete*
  checkpoint: its ``trainer_state.json`` (written last by the Trainer) parses. A checkpoint cut
  short by a kill while saving is passed over, with a warning naming it.
- **Other settings.** Every checkpoint carries the ``gmt_*`` settings it was trained with, inside
  ``trainer_state.json`` (``stateful_callbacks``: :class:`GMTRunRecord`). Resuming with a different
  ratio, granularity, mode, selection, exclude list or seed refuses, naming each difference,
  unless ``gmt_resume_changed_settings: true`` (then GMT's telemetry also starts afresh).
- **State the run cannot load.** A checkpoint's folder says how it was saved (DeepSpeed: ``global_stepN/``
  with one ``zero_pp_rank_R_..._optim_states.pt`` per process; FSDP: ``optimizer.bin``/``optimizer_0/``;
  else ``optimizer.pt``). Resuming a DeepSpeed checkpoint without DeepSpeed would silently restart the
  optimizer (Adam's moments and step count) and the learning-rate schedule: refused unless
  ``gmt_resume_reset_optimizer: true``. What cannot be resumed at all (a ZeRO checkpoint on another
  number of processes, which DeepSpeed refuses with a traceback; a checkpoint without DeepSpeed state
  under DeepSpeed; an FSDP one without FSDP) is refused naming what the user can do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .stats_file import STATS_FILE

__all__ = [
    "RUN_FILES",
    "GMTRunRecord",
    "RunFolderError",
    "check_resume_settings",
    "clear_previous_run",
    "complete_checkpoint",
    "newest_complete_checkpoint",
    "optimizer_state_problem",
    "prepare_run_folder",
    "previous_run",
    "remove_stale_temporaries",
    "resolve_resume",
    "saved_optimizer",
    "saved_record",
    "settings_of",
]

# What a command line's ``--resume_from_checkpoint`` may say instead of a path (a YAML `true` is a bool).
BOOLEAN_WORDS = ("true", "false", "yes", "no", "1", "0", "")
SETTINGS = ("gmt_mask_ratio", "gmt_granularity", "gmt_mode", "gmt_selection", "gmt_exclude", "gmt_seed")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_model.safetensors", "trainer_state.json", "training_args.bin")
# What a run writes into output_dir besides checkpoint-N/ (the Trainer, TRL's model card, the tokenizer,
# TensorBoard's runs/, ``gmt-align report``); overwrite_output_dir removes these and nothing else.
RUN_FILES = re.compile(
    r"^(README\.md|config\.json|generation_config\.json|chat_template\.jinja|training_args\.bin|"
    r"(all|train|eval)_results\.json|trainer_state\.json|runs|"
    r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?|adapter_config\.json|"
    r"pytorch_model_fsdp(_\d+)?(\.bin)?|optimizer(_\d+)?(\.bin|\.pt)?|scheduler\.pt|rng_state(_\d+)?\.pth|"
    r"tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|"
    r"merges\.txt|gmt_stats\.jsonl|gmt_run\.json|gmt_summary\.txt|gmt_overall\.png|gmt_\w+_heatmap\.png)$")
# Left by a save that was killed: safetensors' temporary (Rust tempfile: ".tmp" and 6 characters,
# renamed to model.safetensors when whole) and gmt-align's own "*.partial" (gmt_stats.jsonl, telemetry).
_TEMPORARY = re.compile(r"^(\.tmp[A-Za-z0-9]{6}|gmt_[\w.]+\.partial)$")
_ZERO_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


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
    """Remove what an earlier run wrote into ``output_dir`` (``overwrite_output_dir``): its checkpoints
    and every file of :data:`RUN_FILES`; says in one line (stderr) what went and which files it kept."""
    folder = Path(output_dir)
    removed, kept = [], []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (_CHECKPOINT.match(path.name) and path.is_dir()) and not RUN_FILES.match(path.name):
            if not path.name.startswith("."):
                kept.append(path.name)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        shown = ", ".join(removed[:6]) + (f", ... {len(removed)} in all" if len(removed) > 6 else "")
        note = f"; kept what it did not write: {', '.join(kept)}" if kept else ""
        print(f"gmt-align: overwrite_output_dir: removed the earlier run from {output_dir} ({shown}){note}",
              file=sys.stderr, flush=True)
    return removed


def remove_stale_temporaries(output_dir: str) -> list[Path]:
    """Remove the temporaries of killed saves from ``output_dir`` and its checkpoints (one line on
    stderr). Only safe while this run holds the folder (:mod:`gmt_align.training.run_lock`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    removed, size = [], 0
    for directory in [folder, *_checkpoints(folder)]:
        for path in sorted(directory.iterdir()):
            if _TEMPORARY.match(path.name) and path.is_file():
                try:
                    size += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:  # another node's first process, on a shared filesystem
                    continue
                removed.append(path)
    if removed:
        shown = ", ".join(str(path) for path in removed[:3]) + (", ..." if len(removed) > 3 else "")
        print(f"gmt-align: removed {len(removed)} temporary file(s) left by an interrupted save "
              f"({size / 1e6:.1f} MB): {shown}", file=sys.stderr, flush=True)
    return removed


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The checkpoint ``resume_from_checkpoint: true`` would take (``None`` if none), quietly."""
    folder = Path(output_dir)
    for checkpoint in reversed(_checkpoints(folder) if folder.is_dir() else []):
        if complete_checkpoint(checkpoint) is None:
            return str(checkpoint)
    return None


# --- the optimizer state a checkpoint holds, and whether this run can load it ------------------------
def saved_optimizer(checkpoint: str | os.PathLike) -> tuple[str, int | None]:
    """How ``checkpoint`` holds its optimizer state: ``("deepspeed", processes)`` (``None`` when not
    partitioned: ZeRO stage 0), ``("fsdp", None)``, ``("torch", None)`` (``optimizer.pt``) or ``("none", None)``."""
    folder = Path(checkpoint)
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else None
    steps = [folder / tag] if tag else sorted(folder.glob("global_step*"))
    for step in (path for path in steps if path.is_dir()):
        ranks = {m.group(1) for path in step.iterdir() if (m := _ZERO_SHARD.match(path.name))}
        return "deepspeed", len(ranks) or None
    if (folder / "optimizer.bin").is_file() or any(path.is_dir() and path.name.startswith("optimizer")
                                                   for path in folder.iterdir()):
        return "fsdp", None
    return ("torch" if (folder / "optimizer.pt").is_file() else "none"), None


def _run_kind(args) -> str:
    """``deepspeed`` (``--deepspeed``, or an accelerate config: TrainingArguments then builds a
    DeepSpeed plugin), ``fsdp`` (the recipe's ``fsdp``, or an accelerate FSDP config) or ``torch``."""
    if getattr(args, "deepspeed_plugin", None) is not None or getattr(args, "deepspeed", None):
        return "deepspeed"
    if getattr(args, "fsdp_plugin_args", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "torch"


_LOST = "the optimizer's moments and step count and the learning-rate schedule would start afresh"


def optimizer_state_problem(checkpoint: str, args, world_size: int | None = None) -> str | None:
    """One line if this run cannot restore what ``checkpoint`` holds (see the module docstring);
    ``world_size``: this run's number of processes (``None``: unknown, e.g. ``gmt-align validate``)."""
    kind, ranks = saved_optimizer(checkpoint)
    run = _run_kind(args)
    fresh = f"start a new run from its weights (--model_name_or_path {checkpoint}; optimizer and schedule start afresh)"
    if run == "deepspeed":
        if kind != "deepspeed":
            return (f"{checkpoint} was saved without DeepSpeed ({'no optimizer state' if kind == 'none' else kind}), "
                    f"and DeepSpeed resumes only from its own checkpoints: resume without --deepspeed, or {fresh}")
        if ranks and world_size and ranks != world_size:
            return (f"{checkpoint} holds DeepSpeed ZeRO optimizer state partitioned over {ranks} processes and this "
                    f"run has {world_size}; DeepSpeed cannot re-partition it: resume on {ranks} processes, or {fresh}")
        return None
    if kind == "deepspeed" and run == "torch":
        if not any((Path(checkpoint) / name).is_file() for name in _WEIGHTS):
            return (f"{checkpoint} holds its weights only as DeepSpeed ZeRO shards, which a run without DeepSpeed "
                    f"cannot read: resume with --deepspeed on {ranks or 'the same number of'} processes")
        if not args.gmt_resume_reset_optimizer:
            where = f" on {ranks} processes" if ranks else ""
            return (f"{checkpoint} holds its optimizer state as DeepSpeed ZeRO state{where}, which a run without "
                    f"DeepSpeed cannot load: {_LOST}; resume with --deepspeed{where}, or pass "
                    "--gmt_resume_reset_optimizer true to accept that")
    if kind == "fsdp" and run != "fsdp":
        return (f"{checkpoint} was saved under FSDP, which only FSDP can resume: launch with the same accelerate "
                "FSDP config")
    if kind == "none" and run == "torch" and not args.gmt_resume_reset_optimizer:
        return (f"{checkpoint} holds no optimizer state (saved with save_only_model?): {_LOST}; pass "
                "--gmt_resume_reset_optimizer true to accept that")
    return None


def prepare_run_folder(args, first_on_node: bool, world_size: int | None = None) -> str | None:
    """Check ``output_dir`` and the checkpoint to resume from; returns that checkpoint (or ``None``).

    Raises :class:`RunFolderError` with one line. The first process of each node (``first_on_node``,
    which must hold the folder: :func:`gmt_align.training.run_lock.claim_run_folder`) removes the
    temporaries of killed saves and, with ``overwrite_output_dir``, the earlier run. ``world_size``:
    this run's number of processes, checked against a DeepSpeed checkpoint's (``None``: not checked).
    """
    if first_on_node:
        remove_stale_temporaries(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume is not None:
        changed = check_resume_settings(resume, args)
        if changed and not args.gmt_resume_changed_settings:
            raise RunFolderError(
                f"{resume} was trained with other GMT settings ({'; '.join(changed)}); resume with the same "
                "settings, or pass --gmt_resume_changed_settings true to continue under the new ones"
            )
        problem = optimizer_state_problem(resume, args, world_size)
        if problem:
            raise RunFolderError(problem)
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
