"""``GMTSFTTrainer`` and ``GMTDPOTrainer``: TRL's trainers with the GMT engine attached.

The trainers add one callback and extend ``log()``; nothing of TRL's training loop is copied.
The engine is attached in ``on_train_begin``, after ``accelerator.prepare`` has built the
optimizer that really steps (a torch optimizer, or DeepSpeed's ZeRO optimizer), and figures
leave through the Trainer's own ``log()`` so every ``report_to`` backend receives them. The same
callback saves the mask telemetry (:mod:`gmt_align.telemetry`) with each checkpoint and takes it
back on resume; rank 0 also appends each logging step's figures to ``OUTPUT_DIR/gmt_stats.jsonl``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOTrainer, SFTTrainer

from .adapters import attach
from .config import GMTArguments, GMTSettingError, exclude_problems, mask_options
from .distributed import rank_of, world_size_of
from .report import STATS_FILE
from .runs import GMTRunRecord, check_resume_settings, prepare_run_folder, saved_record
from .selection import NonFiniteGradientError
from .telemetry import MaskTelemetry, append_jsonl


__all__ = ["GMTDPOTrainer", "GMTSFTTrainer"]


class _AttachGMT(TrainerCallback):
    """Attaches the engine once the prepared optimizer exists; saves and restores its telemetry."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer
        if trainer.gmt is not None:
            trainer.gmt.detach()
        trainer.gmt = attach(optimizer, model, mask_options(args), lambda: state.global_step)
        trainer.mask_telemetry = MaskTelemetry(trainer.gmt.engine, per_entry=args.gmt_telemetry)
        if trainer._gmt_resume and args.gmt_telemetry:
            path = Path(trainer._gmt_resume) / f"gmt_telemetry_rank{rank_of()}.pt"
            why = "no gmt telemetry in the checkpoint" if not path.is_file() else \
                trainer.mask_telemetry.load_state_dict(torch.load(path), world_size_of())
            if why:
                warnings.warn(f"GMT coverage starts afresh at step {state.global_step}: {why}", stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        """A step that ZeRO skipped for a non-finite gradient norm (fp32/bf16): the same rule as
        GMT's own check, on every rank (DeepSpeed's overflow flag is already reduced)."""
        if not self.trainer.gmt.backend_overflowed():
            return
        if args.gmt_nonfinite == "skip":
            self.trainer.gmt.skipped_steps.add(state.global_step - 1)
            return
        raise NonFiniteGradientError(
            f"step {state.global_step}: the gradient norm is inf/NaN and DeepSpeed skipped the step; "
            "GMT refuses to go on (gmt_nonfinite: skip would skip such steps)"
        )

    def on_save(self, args, state, control, **kwargs):
        telemetry = self.trainer.mask_telemetry
        if telemetry is not None and telemetry.per_entry:  # every rank saves its own fragments
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            torch.save(telemetry.state_dict(world_size_of()), checkpoint / f"gmt_telemetry_rank{rank_of()}.pt")

    def on_log(self, args, state, control, **kwargs):
        """W&B: the per-block kept fractions as one histogram per logging step (bins are blocks)."""
        by_block = self.trainer._gmt_by_block
        if not by_block or "wandb" not in (args.report_to or []) or not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is not None:
            edges = list(range(len(by_block) + 1))
            wandb.run.log({"train/gmt/kept_fraction_by_block": wandb.Histogram(np_histogram=(by_block, edges)),
                           "train/global_step": state.global_step})


class _GMTMixin:
    gmt = None  # the adapter, once attached
    mask_telemetry: MaskTelemetry | None = None
    _gmt_resume: str | None = None  # the checkpoint training resumes from
    _gmt_by_block: list[float] = []  # kept fraction per block at the last logging step

    def __init__(self, model, *args, **kwargs):
        parent_init = super().__init__  # SFTTrainer takes args second, DPOTrainer third
        config = inspect.signature(parent_init).bind_partial(model, *args, **kwargs).arguments.get("args")
        if not isinstance(config, GMTArguments):  # checked before TRL loads any model
            raise TypeError(
                f"{type(self).__name__} needs args=GMTSFTConfig(...) or GMTDPOConfig(...), "
                f"got {type(config).__name__}"
            )
        parent_init(model, *args, **kwargs)
        self.gmt_record = GMTRunRecord()
        self.add_callback(self.gmt_record)
        if self.args.gmt_mask_ratio > 0:
            problems = exclude_problems(self.args.gmt_exclude, self.model)
            if problems:
                raise GMTSettingError(problems[0])
            self.add_callback(_AttachGMT(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """As the Trainer's, after :func:`gmt_align.runs.prepare_run_folder`: ``True`` means the newest
        complete checkpoint, other ``gmt_*`` settings are refused, a folder holding another run too."""
        self.args.resume_from_checkpoint = resume_from_checkpoint
        resume_from_checkpoint = prepare_run_folder(self.args, first_on_node=self.args.local_process_index == 0)
        record = saved_record(resume_from_checkpoint) if resume_from_checkpoint else None
        if record and record.get("run_id"):
            self.gmt_record.run_id = record["run_id"]  # a resumed run is the same run
        # Telemetry (coverage) continues only under the settings it was gathered with (a change got
        # this far only with gmt_resume_changed_settings).
        changed = bool(resume_from_checkpoint and check_resume_settings(resume_from_checkpoint, self.args))
        self._gmt_resume = None if changed else resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self._gmt_by_block = []
        if self.gmt is not None and self.gmt.skipped_steps and "loss" in logs:
            logs["gmt/skipped_steps"] = len(self.gmt.skipped_steps)  # the same set on every rank
        if self.mask_telemetry is not None and "loss" in logs:  # collective: every rank logs
            stats, self._gmt_by_block = self.mask_telemetry.pop_stats()
            logs.update(stats)
            if stats and self.is_world_process_zero():
                os.makedirs(self.args.output_dir, exist_ok=True)
                record = {"step": self.state.global_step, **stats, "gmt/kept_fraction_by_block": self._gmt_by_block}
                append_jsonl(Path(self.args.output_dir) / STATS_FILE, record)
        super().log(logs, *args, **kwargs)


class GMTSFTTrainer(_GMTMixin, SFTTrainer):
    """``trl.SFTTrainer`` with Gradient-Mask Tuning; takes a :class:`~gmt_align.GMTSFTConfig`."""


class GMTDPOTrainer(_GMTMixin, DPOTrainer):
    """``trl.DPOTrainer`` with Gradient-Mask Tuning; takes a :class:`~gmt_align.GMTDPOConfig`."""
