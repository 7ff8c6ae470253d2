"""``GMTSFTTrainer``, ``GMTDPOTrainer`` and ``GMTGRPOTrainer``: TRL's trainers with the GMT engine attached, and
:func:`with_gmt`, which puts it on any other ``transformers.Trainer`` (TRL's KTO, RLOO, reward, GRPO
trainers, or your own): ``with_gmt(trl.KTOTrainer)`` with ``args=gmt_config(trl.KTOConfig)(...)``.

The trainers add one callback and extend ``log()``; nothing of TRL's training loop is copied.
The engine is attached in ``on_train_begin``, after ``accelerator.prepare`` has built the
optimizer that really steps (a torch optimizer, or DeepSpeed's ZeRO optimizer), and figures
leave through the Trainer's own ``log()`` so every ``report_to`` backend receives them (the
console and W&B see them through :mod:`gmt_align.training.log_routing`). The same callback saves the mask
telemetry (:mod:`gmt_align.training.telemetry`) and the run id with each checkpoint and takes them back on
resume; rank 0 also appends each logging step's figures to ``OUTPUT_DIR/gmt_stats.jsonl``
(:mod:`gmt_align.training.stats_file`).

A mask is computed on one path per optimizer step: the step pre-hook (``adapters/hooks.py``,
:class:`~gmt_align.backends.MaskHooks`, held as ``trainer.mask_hooks``) -> ``MaskEngine.apply``
(``engine.py``) -> the selection rule (``rules.py``; magnitude: ``selection.select_and_mask``) ->
the fused passes over the gradient (``kernels.py``, ``csrc/gmt_cpu.cpp``). The run's folder and
resuming are checked by :mod:`gmt_align.training.runs` before training starts.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Sized
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from gmt_align.backends import attach
from gmt_align.core.distributed import AllReduce, rank_of, world_size_of
from gmt_align.core.selection import NonFiniteGradientError

from .config import GMTArguments, GMTSettingError, caller_module, exclude_problems, mask_options
from .figures import is_group_key
from .log_routing import route_figures
from .run_lock import claim_run_folder, release_run_folder
from .runs import GMTRunRecord, check_resume_settings, prepare_run_folder
from .stats_file import STATS_FILE, TelemetryStateError, append_record, continue_run, read_run_id, write_run_id
from .telemetry import MaskTelemetry, read_state
from .truncation import check_truncation

__all__ = ["GMTDPOTrainer", "GMTGRPOTrainer", "GMTSFTTrainer", "GMTTrainerMixin", "with_gmt"]


class _AttachGMT(TrainerCallback):
    """Attaches the engine once the prepared optimizer exists; saves and restores its telemetry."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer
        if trainer.mask_hooks is not None:
            trainer.mask_hooks.detach()
        trainer.mask_hooks = attach(optimizer, model, mask_options(args), lambda: state.global_step)
        trainer.mask_hooks.zero_gradient_fails = not trainer.gmt_zero_gradient_is_normal()
        start_telemetry(trainer, args, state, restart=trainer._gmt_restart_telemetry)

    def on_step_end(self, args, state, control, **kwargs):
        """A step whose gradient was exactly zero everywhere, if no step call could tell (see
        ``MaskHooks.step_ended``); a step that ZeRO skipped for a non-finite gradient norm (fp32/bf16):
        the same rule as GMT's own check, on every rank (DeepSpeed's overflow flag is already reduced)."""
        self.trainer.mask_hooks.step_ended()  # a gradient exactly zero everywhere, if not decided in the step
        if not self.trainer.mask_hooks.backend_overflowed():
            return
        if args.gmt_nonfinite == "skip":
            self.trainer.mask_hooks.skipped_steps.add(state.global_step - 1)
            return
        raise NonFiniteGradientError(
            f"step {state.global_step}: the gradient norm is inf/NaN and DeepSpeed skipped the step; "
            "GMT refuses to go on (gmt_nonfinite: skip would skip such steps)"
        )

    def on_save(self, args, state, control, **kwargs):
        save_telemetry(self.trainer, args, state)


# --- telemetry: start or continue a run's figures; save them with checkpoints -----------------------
def telemetry_file(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / f"gmt_telemetry_rank{rank_of()}.pt"


def start_telemetry(trainer, args, state, restart: bool = False) -> None:
    """Telemetry for this run: the per-entry state saved with the checkpoint training resumes from
    (unless ``restart``: coverage then starts afresh) and, on rank 0, ``gmt_stats.jsonl`` tied to
    the run (:func:`gmt_align.training.stats_file.continue_run`), in that order, so that nothing is written
    when a state file cannot be read.

    Collective: every rank learns whether any could not go on, so they raise (an unreadable file:
    :class:`TelemetryStateError`) or start coverage afresh (state missing on a rank, or saved with
    another world size) together.
    """
    telemetry = trainer.mask_telemetry = MaskTelemetry(trainer.mask_hooks.engine, per_entry=args.gmt_telemetry)
    resume = trainer._gmt_resume
    afresh = None

    def restore():
        nonlocal afresh
        if resume and args.gmt_telemetry:
            path = telemetry_file(resume)
            afresh = ("coverage restart requested" if restart else f"no {path.name} in {resume}" if not path.is_file()
                      else telemetry.load_state_dict(read_state(path), world_size_of()))

    def tie_stats_file():
        if state.is_world_process_zero:
            saved = read_run_id(resume) if resume else None
            trainer._gmt_run_id = continue_run(Path(args.output_dir) / STATS_FILE, saved,
                                               state.global_step if resume else None)

    _on_every_rank(restore)
    _on_every_rank(tie_stats_file)
    if AllReduce()(torch.tensor([afresh is not None], dtype=torch.int64)).item():
        telemetry.pending = {}
        warnings.warn(f"GMT coverage starts afresh at step {state.global_step}: "
                      f"{afresh or 'another rank holds no telemetry state'}", stacklevel=2)


def _on_every_rank(step) -> None:
    """Run ``step``; if it raised :class:`TelemetryStateError` on any rank, raise on every rank."""
    problem = None
    try:
        step()
    except TelemetryStateError as error:
        problem = error
    if AllReduce()(torch.tensor([problem is not None], dtype=torch.int64)).item():
        raise problem or TelemetryStateError("GMT telemetry could not continue on another rank (see its error)")


def save_telemetry(trainer, args, state) -> None:
    """Each rank's per-entry state and (rank 0) the run id, into the checkpoint being saved; written
    to a temporary name and renamed, so a kill while saving leaves no truncated file."""
    checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    telemetry = trainer.mask_telemetry
    if telemetry is not None and telemetry.per_entry:  # every rank saves its own fragments
        checkpoint.mkdir(parents=True, exist_ok=True)
        path = telemetry_file(checkpoint)
        torch.save(telemetry.state_dict(world_size_of()), path.with_name(path.name + ".partial"))
        os.replace(path.with_name(path.name + ".partial"), path)
    if state.is_world_process_zero and trainer._gmt_run_id is not None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        write_run_id(checkpoint, trainer._gmt_run_id)


def log_figures(trainer, logs: dict) -> None:
    """Add the figures since the last log to ``logs`` (collective: every rank logs at the same
    steps) and, on rank 0, append them to ``gmt_stats.jsonl`` with the run id and step."""
    figures = trainer.mask_telemetry.pop_figures()
    logs.update(figures)
    if figures and trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        record = {"run_id": trainer._gmt_run_id, "step": trainer.state.global_step, **figures}
        append_record(Path(trainer.args.output_dir) / STATS_FILE, record)


class GMTTrainerMixin:
    """GMT on a ``transformers.Trainer`` subclass: put it first among the bases, or use :func:`with_gmt`.
    The config (``args``) must carry the ``gmt_*`` fields (:func:`gmt_align.training.config.gmt_config`).
    Everything below holds for every trainer built this way: the engine attached inside the step of
    the optimizer that really steps (one process, DDP, ZeRO-1/2/3, FSDP2), the run-folder and resume
    rules, the non-finite rule, the telemetry and ``gmt_stats.jsonl``."""

    mask_hooks = None  # MaskHooks: GMT inside the optimizer's step, once attached
    mask_telemetry: MaskTelemetry | None = None
    _gmt_resume: str | None = None  # the checkpoint training resumes from
    _gmt_restart_telemetry = False  # resumed under other gmt_* settings: coverage starts afresh
    _gmt_run_id: str | None = None  # rank 0: the run that gmt_stats.jsonl and checkpoints belong to

    def __init__(self, model, *args, **kwargs):
        parent_init = super().__init__  # SFTTrainer takes args second, DPOTrainer third
        config = inspect.signature(parent_init).bind_partial(model, *args, **kwargs).arguments.get("args")
        if not isinstance(config, GMTArguments):  # checked before TRL loads any model
            raise TypeError(
                f"{type(self).__name__} needs args with the gmt_* fields (GMTSFTConfig, GMTDPOConfig, or "
                f"gmt_config(ITS_CONFIG_CLASS)(...)), got {type(config).__name__}"
            )
        data = inspect.signature(parent_init).bind_partial(model, *args, **kwargs).arguments.get("train_dataset")
        rows_before = len(data) if isinstance(data, Sized) else None
        parent_init(model, *args, **kwargs)
        # Before training: data that max_length leaves without an answer is refused, a partial loss said.
        said = check_truncation(self.train_dataset, rows_before, getattr(self.args, "max_length", None),
                                getattr(self.args, "truncation_mode", "keep_start"),
                                getattr(self.args, "packing", False))
        if said and self.args.process_index == 0:  # one line (warnings.warn would add its source line)
            print(f"gmt-align: warning: {said}", file=sys.stderr, flush=True)
        self.gmt_record = GMTRunRecord()
        self.add_callback(self.gmt_record)
        if self.args.gmt_mask_ratio > 0:
            problems = exclude_problems(self.args.gmt_exclude, self.model)
            if problems:
                raise GMTSettingError(problems[0])
            self.add_callback(_AttachGMT(self))
            route_figures(self)

    def gmt_zero_gradient_is_normal(self) -> bool:
        """Whether a step whose gradient is exactly zero everywhere is normal (it goes on) rather than a
        diverged run (the ``gmt_nonfinite`` rule): so for online RL, trainers with reward functions
        (GRPO, RLOO), whose advantages are all zero when every group's completions got equal rewards."""
        return getattr(self, "reward_funcs", None) is not None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """As the Trainer's, holding ``output_dir`` (:mod:`gmt_align.training.run_lock`) after
        :func:`gmt_align.training.runs.prepare_run_folder`: ``True`` means the newest complete checkpoint;
        other ``gmt_*`` settings, optimizer state the run cannot load, a folder holding another run are refused."""
        self.args.resume_from_checkpoint = resume_from_checkpoint
        took = claim_run_folder(self.args)  # held already when gmt-align sft|dpo parsed the recipe
        try:
            resume_from_checkpoint = prepare_run_folder(self.args, first_on_node=self.args.local_process_index == 0,
                                                        world_size=self.args.world_size)
            self._gmt_resume = resume_from_checkpoint
            # Coverage continues only under the settings it was gathered with (a change got this far only
            # with gmt_resume_changed_settings); the run, and its gmt_stats.jsonl, go on either way.
            self._gmt_restart_telemetry = bool(resume_from_checkpoint and check_resume_settings(resume_from_checkpoint,
                                                                                                self.args))
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if took:
                release_run_folder(self.args.output_dir)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs also carry the ``gmt/...`` figures; the per-group ones (``gmt/FIGURE/GROUP``)
        go to the backends and ``gmt_stats.jsonl`` but are kept out of ``log_history`` (and so of
        every checkpoint's ``trainer_state.json``)."""
        if self.mask_hooks is not None and self.mask_hooks.skipped_steps and "loss" in logs:
            logs["gmt/skipped_steps"] = len(self.mask_hooks.skipped_steps)  # the same set on every rank
        with_figures = self.mask_telemetry is not None and "loss" in logs
        if with_figures:
            log_figures(self, logs)
        super().log(logs, *args, **kwargs)
        if with_figures and self.state.log_history:
            entry = self.state.log_history[-1]
            for key in [key for key in entry if is_group_key(key)]:
                del entry[key]


def with_gmt(trainer_class: type, name: str | None = None) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass) with GMT: ``GMT<Name>``, whose ``args``
    must carry the ``gmt_*`` fields (:func:`gmt_align.training.config.gmt_config`)::

        GMTKTOTrainer = with_gmt(trl.KTOTrainer)
        trainer = GMTKTOTrainer(model, args=gmt_config(trl.KTOConfig)(output_dir="out"), train_dataset=data)
    """
    from transformers import Trainer

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_gmt needs a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, GMTTrainerMixin):
        return trainer_class
    return type(name or f"GMT{trainer_class.__name__}", (GMTTrainerMixin, trainer_class), {
        "__doc__": f"``{trainer_class.__module__.partition('.')[0]}.{trainer_class.__name__}`` with Gradient-Mask "
                   "Tuning; its ``args`` carry the ``gmt_*`` fields.",
        "__module__": caller_module(),
    })


GMTSFTTrainer = with_gmt(SFTTrainer)
GMTDPOTrainer = with_gmt(DPOTrainer)
GMTGRPOTrainer = with_gmt(GRPOTrainer)
