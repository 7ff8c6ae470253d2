"""``GMTSFTTrainer`` and ``GMTDPOTrainer``: TRL's trainers with the GMT engine attached.

The trainers add one callback and extend ``log()``; nothing of TRL's training loop is copied.
The engine is attached in ``on_train_begin``, after ``accelerator.prepare`` has built the
optimizer that really steps (a torch optimizer, or DeepSpeed's ZeRO optimizer), and figures
leave through the Trainer's own ``log()`` so every ``report_to`` backend receives them.
"""

from __future__ import annotations

import inspect

from transformers import TrainerCallback
from trl import DPOTrainer, SFTTrainer

from .adapters import attach
from .config import GMTArguments, mask_options

__all__ = ["GMTDPOTrainer", "GMTSFTTrainer"]


class _AttachGMT(TrainerCallback):
    """Attaches the engine once the prepared optimizer exists."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.trainer.gmt is not None:
            self.trainer.gmt.detach()
        self.trainer.gmt = attach(optimizer, model, mask_options(args), lambda: state.global_step)


class _GMTMixin:
    gmt = None  # the adapter, once attached

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

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.gmt is not None and "loss" in logs:
            logs.update(self.gmt.engine.pop_stats())
        super().log(logs, *args, **kwargs)


class GMTSFTTrainer(_GMTMixin, SFTTrainer):
    """``trl.SFTTrainer`` with Gradient-Mask Tuning; takes a :class:`~gmt_align.GMTSFTConfig`."""


class GMTDPOTrainer(_GMTMixin, DPOTrainer):
    """``trl.DPOTrainer`` with Gradient-Mask Tuning; takes a :class:`~gmt_align.GMTDPOConfig`."""
