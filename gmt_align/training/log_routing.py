"""Where the ``gmt/...`` figures go once the trainers have logged them.

The GMT trainers put every figure into the Trainer's ``log()``, so each ``report_to`` backend
(TensorBoard, MLflow, ...) receives the per-block and per-kind figures as plain scalars and rank 0
writes them to ``gmt_stats.jsonl``. Two kinds of the Trainer's own callbacks are swapped, with
``Trainer.pop_callback`` / ``add_callback``, for subclasses that differ only in ``on_log``:

* the console (``ProgressCallback``, or ``PrinterCallback`` with ``disable_tqdm``) prints the
  headline figures only (:data:`gmt_align.training.figures.HEADLINE`), not the other ``gmt/`` keys;
* W&B (``WandbCallback``) gets, instead of one flat line chart per group and figure, per figure a
  ``wandb.Histogram`` whose bins are the blocks in order and whose heights are the figure
  (``train/gmt/FIGURE_by_block``; W&B's histogram panel draws it as a block × step map), and one
  ``wandb.Table`` with a row per block and per module kind (``train/gmt/groups``). Rank 0 also
  writes the W&B run's id, project and entity to ``OUTPUT_DIR/wandb_run.json`` (:data:`WANDB_RUN_FILE`),
  so that ``gmt-align eval`` can log its figures to the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .figures import HEADLINE, is_group_key, split_group_key

__all__ = ["WANDB_RUN_FILE", "GMTPrinterCallback", "GMTProgressCallback", "console_view", "route_figures",
           "wandb_panels"]

WANDB_RUN_FILE = "wandb_run.json"  # in output_dir: {"id", "project", "entity"} of the run's W&B run


def console_view(logs: dict | None) -> dict | None:
    """``logs`` without the ``gmt/`` keys that are not headline figures (``gmt/skipped_steps``, logged
    only once a step was skipped, stays)."""
    if logs is None:
        return None
    return {key: value for key, value in logs.items()
            if not key.startswith("gmt/") or key in HEADLINE or key == "gmt/skipped_steps"}


class GMTProgressCallback(ProgressCallback):
    """transformers' progress bar; its log lines carry only the headline ``gmt/`` figures."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_view(logs), **kwargs)


class GMTPrinterCallback(PrinterCallback):
    """transformers' log printer (``disable_tqdm``), with only the headline ``gmt/`` figures."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_view(logs), **kwargs)


def wandb_panels(logs: dict, wandb) -> dict:
    """The per-group figures of ``logs`` as W&B objects: ``gmt/FIGURE_by_block`` histograms (bins:
    blocks, in order) and the ``gmt/groups`` table (a row per group, a column per figure)."""
    table: dict[str, dict[str, float]] = {}
    for key, value in logs.items():
        if is_group_key(key):
            figure, group = split_group_key(key)
            table.setdefault(group, {})[figure] = value
    if not table:
        return {}
    figures = sorted({figure for row in table.values() for figure in row})
    panels = {}
    blocks = sorted(group for group in table if group.startswith("block_"))
    for figure in figures:
        values = [table[block].get(figure) for block in blocks]
        if blocks and None not in values:
            panels[f"gmt/{figure}_by_block"] = wandb.Histogram(np_histogram=(values, list(range(len(blocks) + 1))))
    rows = [[group, *(table[group].get(figure) for figure in figures)] for group in table]
    panels["gmt/groups"] = wandb.Table(columns=["group", *figures], data=rows)
    return panels


def _wandb_callback():
    """The W&B subclass, built only when W&B is in use (transformers imports wandb for it)."""
    from transformers.integrations import WandbCallback

    class GMTWandbCallback(WandbCallback):
        """transformers' W&B callback; per-group ``gmt/`` figures become panels (see the module)."""

        def setup(self, args, state, model, **kwargs):
            super().setup(args, state, model, **kwargs)
            import wandb  # imported by WandbCallback already

            run = wandb.run if state.is_world_process_zero else None
            if run is not None:  # which W&B run this output_dir belongs to (gmt-align eval logs there too)
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                record = {"id": run.id, "project": run.project, "entity": run.entity}
                (Path(args.output_dir) / WANDB_RUN_FILE).write_text(json.dumps(record) + "\n")

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            logs = logs or {}
            flat = {key: value for key, value in logs.items() if not is_group_key(key)}
            if state.is_world_process_zero:
                import wandb  # imported by WandbCallback already: it refuses to exist without it

                flat.update(wandb_panels(logs, wandb))
            super().on_log(args, state, control, model=model, logs=flat, **kwargs)

    return WandbCallback, GMTWandbCallback


def route_figures(trainer) -> None:
    """Swap the trainer's console printer and W&B callback for the routing subclasses above."""
    callbacks = trainer.callback_handler.callbacks
    for callback in list(callbacks):
        if type(callback) is ProgressCallback:
            trainer.pop_callback(callback)
            trainer.add_callback(GMTProgressCallback(max_str_len=callback.max_str_len))
        elif type(callback) is PrinterCallback:
            trainer.pop_callback(callback)
            trainer.add_callback(GMTPrinterCallback())
        elif type(callback).__name__ == "WandbCallback":
            plain, routed = _wandb_callback()
            if type(callback) is plain:
                trainer.pop_callback(callback)
                trainer.add_callback(routed())
