"""SIGTERM, what a scheduler sends before it preempts or times out a job: stop with one line, save nothing half.

Python's default for SIGTERM ends the process at once and without a word, in the middle of a checkpoint
if one is being written. :class:`StopOnSigterm` (installed by ``gmt-align sft|dpo|grpo`` for the whole run)
instead:

- outside a save, stops at once (ended by the signal, as by default: status 143 in a shell) after one
  line on stderr: the step reached and the last complete checkpoint, with the option that resumes from it;
- during a save (from the step whose save the Trainer has decided, to its ``on_save``; the final model's
  save too), lets the save finish first, so the checkpoint is complete rather than torn, then stops the
  same way. A job killed outright (SIGKILL) after the scheduler's grace period leaves what ``kill -9``
  leaves: an incomplete checkpoint, passed over on resume (:mod:`gmt_align.training.runs`). So does a
  save that breaks off because another rank, outside its save when the signal came, stopped at once;
  the line then says so.

No checkpoint is made at SIGTERM: the grace period may be shorter than a save. Every rank that
receives the signal stops; rank 0 prints the line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

from transformers import TrainerCallback

from .runs import newest_complete_checkpoint

__all__ = ["StopOnSigterm"]


class StopOnSigterm(TrainerCallback):
    """Stop a run on SIGTERM, after any save in progress (see the module docstring).

    ``with StopOnSigterm("gmt-align sft", args) as stop:`` installs the handler (main thread only) and
    restores the previous one on leaving; ``trainer.add_callback(stop)`` lets it see the steps and saves;
    ``with stop.saving():`` marks a save made outside the Trainer's loop (the final model).
    """

    def __init__(self, command: str, args):
        self.command, self.args = command, args
        self.step = None  # the last step that ended, once training runs
        self.in_save = False
        self.pending = False
        self.final = False  # the save in progress is the final model's
        self.broken = False  # the save in progress failed after the signal (another rank had gone)
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # the only thread Python delivers signals to
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None and self.pending:  # the save broke off: another rank had stopped at once
            self.broken = True
            self.stop()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    # --- the Trainer's loop: a save is decided at the end of a step or epoch and done before on_save ---------
    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.in_save = self.in_save or control.should_save

    def on_epoch_end(self, args, state, control, **kwargs):
        self.in_save = self.in_save or control.should_save

    def on_save(self, args, state, control, **kwargs):
        self._save_done()

    @contextmanager
    def saving(self, final: bool = False):
        self.in_save, self.final = True, final
        yield  # a save that raises is not done: __exit__ stops, if a signal came
        self._save_done()

    def _save_done(self):
        self.in_save = False
        if self.pending:
            self.stop()

    def _on_sigterm(self, signum, frame):
        if self.in_save:
            self.pending = True  # stopped by _save_done once the checkpoint is whole
            return
        self.stop()

    def message(self) -> str:
        if self.final and not self.broken:
            return (f"{self.command}: stopped by SIGTERM after training ended, once the model was saved to "
                    f"{self.args.output_dir}")
        where = "before training began" if self.step is None else f"after step {self.step}"
        after = (", and the save in progress broke off (another rank had stopped)" if self.broken else
                 ", after finishing the save in progress" if self.pending else "")
        checkpoint = newest_complete_checkpoint(self.args.output_dir)
        if checkpoint is None:
            last = f"{self.args.output_dir} holds no complete checkpoint to resume from"
        else:
            last = f"last complete checkpoint: {checkpoint} (resume with --resume_from_checkpoint true)"
        return f"{self.command}: stopped by SIGTERM {where}{after}; {last}"

    def stop(self):
        if int(os.environ.get("RANK", "0")) == 0:
            print(self.message(), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # End as the default action would (status 143 in a shell), at once: unwinding could wait on
        # collectives that the other ranks have left.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
