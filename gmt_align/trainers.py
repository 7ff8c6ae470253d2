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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import DPOTrainer, SFTTrainer

from .adapters import attach
from .config import GMTArguments, mask_options
from .distributed import rank_of, world_size_of
from .report import STATS_FILE
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
        if self.args.gmt_mask_ratio > 0:
            self.add_callback(_AttachGMT(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # as the Trainer resolves it
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._gmt_resume = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self._gmt_by_block = []
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
