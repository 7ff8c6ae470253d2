"""``gmt-align eval --tasks``: any lm-evaluation-harness task or group on a saved model or PEFT adapter.

    gmt-align eval --model DIR --tasks gsm8k,mbpp [--num_fewshot N] [--limit N] [--batch_size B]
                   [--include_path DIR] [--apply_chat_template] [--confirm_run_unsafe_code]
                   [--output_dir DIR] [--report_to none|wandb]
    gmt-align eval --config RECIPE [--model DIR]     # the recipe's eval_tasks on its output_dir

The evaluation is lm-eval's own (``lm_eval.simple_evaluate`` with its ``hf`` model class; an adapter
is passed as ``peft=``): prompts, few-shot examples, metrics and standard errors are the harness's,
as in any paper that reports lm-eval figures. Here, around it:

* the task names are checked against lm-eval's index (``TaskManager``, with ``--include_path`` for
  your own task YAMLs) before the model loads: an unknown name, or a task that executes model-written
  code without ``--confirm_run_unsafe_code``, is one line and exit status 2;
* the results are written to ``OUTPUT_DIR/lm_eval/results_<UTC time>.json`` (default OUTPUT_DIR: the
  model's folder; earlier results are kept) and printed as lm-eval's table;
* when the model's folder, or the run folder above a checkpoint, holds ``wandb_run.json``
  (written by a training run that reported to W&B), the figures go to that same W&B run, through
  lm-eval's ``WandbLogger`` (``TASK/METRIC`` and ``TASK/METRIC_stderr``, plus its results table);
  ``--report_to wandb`` without such a file starts a new run, ``--report_to none`` logs nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .evaluate import EvalUsageError, adapter_base

__all__ = ["REPORT_TO", "RESULTS_DIR", "check_tasks", "model_args", "run_harness", "split_tasks",
           "task_manager", "training_wandb_run"]

RESULTS_DIR = "lm_eval"  # inside the output folder: one results_<time>.json per evaluation
REPORT_TO = ("auto", "none", "wandb")


def split_tasks(value: str | Sequence[str]) -> list[str]:
    """``gsm8k,mbpp`` (or a recipe's list) -> ["gsm8k", "mbpp"]; empty names are refused."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    if not names or not all(names):
        raise EvalUsageError(f"--tasks {value!r}: give task names separated by commas, e.g. gsm8k,mbpp")
    return names


@lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's index of its tasks and groups, plus the YAMLs under ``include_path``."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalUsageError("--tasks needs lm-evaluation-harness: pip install 'gmt-align[eval]'") from None
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(names: Sequence[str], include_path: str | None, confirm_unsafe: bool) -> None:
    """Every name is an lm-eval task, group or tag; a task that runs model-written code (``unsafe_code``,
    e.g. humaneval, mbpp) needs ``confirm_unsafe``. Raises :class:`EvalUsageError` (one line)."""
    import difflib

    manager = task_manager(include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f" or under --include_path {include_path}" if include_path else ""
        raise EvalUsageError(f"--tasks: {', '.join(unknown)}: not an lm-eval task or group{where}{hint}; "
                             "`lm-eval ls tasks` lists them")
    unsafe = [n for n in names if (manager.task_index[n].cfg or {}).get("unsafe_code")]
    if unsafe and not confirm_unsafe:
        raise EvalUsageError(f"--tasks: {', '.join(unsafe)} executes the code the model writes; add "
                             "--confirm_run_unsafe_code (in a sandbox) to run it")


def model_args(model: str | Path, dtype: str = "auto") -> dict[str, Any]:
    """lm-eval's ``hf`` model arguments: the saved model, or a PEFT adapter (``peft=``) on its base
    (with the adapter folder's tokenizer when it saved one, as ``gmt-align sft --use_peft`` does)."""
    model = Path(model)
    base = adapter_base(model)
    if base is None:
        return {"pretrained": str(model), "dtype": dtype}
    args = {"pretrained": base, "peft": str(model), "dtype": dtype}
    if (model / "tokenizer_config.json").is_file():
        args["tokenizer"] = str(model)
    return args


def training_wandb_run(model: str | Path) -> dict | None:
    """The W&B run (id, project, entity) of the training run that wrote ``model``: its folder's
    ``wandb_run.json`` (:data:`gmt_align.training.log_routing.WANDB_RUN_FILE`), or the run folder's for a
    ``checkpoint-N``; None if neither has one."""
    from gmt_align.training.log_routing import WANDB_RUN_FILE  # here: transformers loads with it

    for folder in (Path(model), Path(model).parent):
        path = folder / WANDB_RUN_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def run_harness(model: str | Path, tasks: Sequence[str], *, num_fewshot: int | None = None,
                limit: float | None = None, batch_size: int = 16, include_path: str | None = None,
                apply_chat_template: bool = False, confirm_unsafe: bool = False,
                output_dir: str | Path | None = None, report_to: str = "auto", device: str | None = None) -> dict:
    """Evaluate with ``lm_eval.simple_evaluate``; write, print and (W&B) log its results; return them."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = simple_evaluate(
        model="hf", model_args=model_args(model), tasks=list(tasks), num_fewshot=num_fewshot,
        limit=limit, batch_size=batch_size, device=device, task_manager=task_manager(include_path),
        apply_chat_template=apply_chat_template, confirm_run_unsafe_code=confirm_unsafe, log_samples=False,
    )
    out = Path(output_dir or model) / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    while path.exists():  # two evaluations in one second: keep both
        path = path.with_name(path.stem + "_" + ".json")
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(f"gmt-align eval: wrote {path}")
    _log_to_wandb(results, model, report_to)
    return results


def _log_to_wandb(results: dict, model: str | Path, report_to: str) -> None:
    """lm-eval's WandbLogger, attached to the training run when the model folder names one."""
    run = training_wandb_run(model)
    if report_to == "none" or (report_to == "auto" and run is None):
        return
    import wandb
    from lm_eval.loggers import WandbLogger

    init = {"job_type": "eval"}
    if run is not None:
        init.update(id=run["id"], project=run.get("project"), entity=run.get("entity"), resume="allow")
    logger = WandbLogger(init_args=init)
    logger.post_init(results)
    logger.log_eval_result()
    print(f"gmt-align eval: logged to W&B run {logger.run.id}" + (" (the training run)" if run else ""))
    wandb.finish()
