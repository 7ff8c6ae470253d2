"""The ``gmt-align`` command: ``gmt-align {sft,dpo} --config RECIPE.yaml [--field value ...]``.

Runs under any launcher unchanged (``accelerate launch -m gmt_align.cli ...``,
``deepspeed --module gmt_align.cli ...``). A bad recipe or option exits with status 2 and one
line on stderr, before any model is loaded. ``gmt-align validate RECIPE.yaml`` checks a recipe
without training and lists every problem (exit status 1 if any; see :mod:`gmt_align.validate`).
``gmt-align report OUTPUT_DIR`` plots a run's mask telemetry (see :mod:`gmt_align.report`).
``gmt-align eval --model DIR --task TASK`` measures accuracy (or NLL, or DPO preference accuracy)
on a held-out split (see :mod:`gmt_align.evaluate`). ``gmt-align env`` prints versions, GPU and kernels for a bug report (see
:mod:`gmt_align.environment`); ``gmt-align --version`` the version.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Sequence

USAGE = """usage: gmt-align COMMAND --config RECIPE.yaml [--field value ...]
       gmt-align validate RECIPE.yaml [RECIPE.yaml ...] [--method sft|dpo] [--here] [--field value ...]
       gmt-align report OUTPUT_DIR [--out DIR]
       gmt-align eval --model DIR --task TASK [--n N] [--seed S] [--batch_size B] [--max_new_tokens M] [--output FILE]
                      [--metric accuracy|nll|preference] [--ref_model DIR] [--beta B]
       gmt-align env | --version

commands:
  sft       supervised fine-tuning with Gradient-Mask Tuning
  dpo       direct preference optimisation with Gradient-Mask Tuning
  validate  check recipes and their DeepSpeed config without loading a model; list every problem
  report    plots and a summary of a run's mask telemetry (OUTPUT_DIR/gmt_stats.jsonl)
  eval      greedy accuracy (95% Wilson interval) on a held-out split: basic_arithmetic,
            chain_sum, gsm_symbolic (reasoning-gym) or humaneval (pass@1); --metric nll: the
            reference answers' mean per-token NLL; --metric preference: DPO preference accuracy
  env       versions, GPU and the GMT kernels that will run (paste it into bug reports)

Any recipe field can be given or overridden on the command line, e.g.
  gmt-align sft --config recipes/quickstart/sft.yaml --max_steps 2 --gmt_mask_ratio 0.3
`gmt-align COMMAND --help` lists every field."""


def _asks_for_deepspeed(argv: list[str]) -> bool:
    """``--deepspeed`` on the command line, or a ``deepspeed:`` key in the ``--config`` recipe."""
    if any(item == "--deepspeed" or item.startswith("--deepspeed=") for item in argv):
        return True
    for index, item in enumerate(argv):
        path = item.split("=", 1)[1] if item.startswith("--config=") else (
            argv[index + 1] if item == "--config" and index + 1 < len(argv) else None)
        if path:
            import yaml

            try:
                recipe = yaml.safe_load(open(path))
            except (OSError, yaml.YAMLError):  # the parser says what is wrong with it
                return False
            return isinstance(recipe, dict) and bool(recipe.get("deepspeed"))
    return False


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import adopt_launcher_arguments, single_process_environment

    argv = adopt_launcher_arguments(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("--version", "-V"):
        from . import __version__

        print(f"gmt-align {__version__}")
        return 0
    if command != "report":
        _import_transformers_quietly()
    if command == "env":
        from .environment import main as env

        return env(rest)
    if command == "validate":
        from .validate import main as validate

        return validate(rest)
    if command == "report":
        from .report import main as report

        return report(rest)
    if command == "eval":
        from .evaluate import main as evaluate

        return evaluate(rest)

    from .recipe import METHODS

    if command not in METHODS:
        choices = ", ".join((*METHODS, "validate", "report", "eval", "env"))
        print(f"gmt-align: error: unknown command {command!r} (choose from {choices})", file=sys.stderr)
        return 2
    # No launcher: DeepSpeed would look for MPI; run as one rank instead. Taken back on return, so
    # that a caller in the same process (a test) does not hand these variables to its children.
    added = single_process_environment() if _asks_for_deepspeed(rest) else {}
    os.environ.update(added)
    try:
        return _run(command, rest)
    finally:
        for name in added:
            os.environ.pop(name, None)


def _run(command: str, rest: list[str]) -> int:
    from .adapters import UnsupportedOptimizerError
    from .config import GMTSettingError
    from .data import DataError
    from .recipe import RecipeError, parse_recipe
    from .runs import RunFolderError
    from .selection import NonFiniteGradientError
    from .stats_file import TelemetryStateError
    from .train import train

    try:
        parsed = parse_recipe(command, rest)
    except RecipeError as error:
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 2
    try:
        train(command, *parsed)
    except (UnsupportedOptimizerError, GMTSettingError, RunFolderError, DataError, TelemetryStateError) as error:
        # all raised before the first step
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as error:  # every rank stops here together; no weight was written
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _import_transformers_quietly() -> None:
    """transformers prints "[INFO] Running in WANDB offline mode" on stdout when its integrations are
    first imported under WANDB_MODE=offline (common on clusters). validate's and eval's stdout is their
    result, and an error must stay one line: the import happens here, and that line is dropped (W&B
    itself says it is offline when a run starts)."""
    if os.environ.get("WANDB_MODE") != "offline" or "transformers.integrations.integration_utils" in sys.modules:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        import transformers.integrations.integration_utils  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
