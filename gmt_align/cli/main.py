"""The ``gmt-align`` command: ``gmt-align {sft,dpo,grpo} --config RECIPE.yaml [--field value ...]``.

Runs under any launcher unchanged (``accelerate launch -m gmt_align.cli ...``,
``deepspeed --module gmt_align.cli ...``). A bad recipe or option exits with status 2 and one
line on stderr, before any model is loaded. ``gmt-align validate RECIPE.yaml`` checks a recipe
without training and lists every problem (exit status 1 if any; see :mod:`gmt_align.cli.validate`).
``gmt-align report OUTPUT_DIR`` plots a run's mask telemetry (see :mod:`gmt_align.cli.report`).
``gmt-align eval --model DIR --tasks gsm8k,mbpp`` runs lm-evaluation-harness tasks; ``--task TASK``
a built-in quick task: accuracy (or NLL, or DPO preference accuracy) on a held-out split (see
:mod:`gmt_align.cli.evaluate`). ``gmt-align env`` prints versions, GPU and
kernels for a bug report (see :mod:`gmt_align.cli.environment`); ``gmt-align --version`` the version.
The subcommands are argparse subparsers; each parses the rest of its line itself. A training command
given ``--accelerate_config NAME|PATH`` or ``--num_processes N`` starts itself again under ``accelerate
launch``, as ``trl sft`` does (see :mod:`gmt_align.cli.launch`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence
from importlib import import_module

# Each command: its help line, and the module whose main(argv) runs it (None: a training run).
COMMANDS = {
    "sft": ("supervised fine-tuning with Gradient-Mask Tuning (a recipe: --config RECIPE.yaml [--field value ...])",
            None),
    "dpo": ("direct preference optimisation with Gradient-Mask Tuning (likewise)", None),
    "grpo": ("group relative policy optimisation (TRL's GRPO) with Gradient-Mask Tuning (likewise)", None),
    "validate": ("check recipes and their DeepSpeed config without loading a model; list every problem", ".validate"),
    "report": ("plots and a summary of a run's mask telemetry (OUTPUT_DIR/gmt_stats.jsonl)", ".report"),
    "eval": ("lm-evaluation-harness tasks (--tasks), or a built-in quick task (--task): greedy accuracy, "
             "--metric nll / preference", ".evaluate"),
    "env": ("versions, GPU and the GMT kernels that will run (paste it into bug reports)", ".environment"),
}
EPILOG = """examples:
  gmt-align sft --config recipes/quickstart/sft.yaml --max_steps 2 --gmt_mask_ratio 0.3
  gmt-align sft --config recipes/quickstart/sft.yaml --accelerate_config zero2 --num_processes 2
  gmt-align validate recipes/quickstart/sft.yaml
  gmt-align report outputs/quickstart-sft
  gmt-align eval --model outputs/quickstart-sft --task basic_arithmetic
`gmt-align COMMAND --help` lists a command's options (for sft, dpo and grpo: every recipe field)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (argparse would print the usage too)
        print(f"gmt-align: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def make_parser() -> argparse.ArgumentParser:
    """The command and its choice of subcommand; each subcommand parses the rest of the line itself
    (the training commands with TRL's ``TrlParser``), as ``trl``'s CLI hands each script its own arguments."""
    from gmt_align import __version__

    parser = _Parser(prog="gmt-align", description="Gradient-Mask Tuning for TRL's trainers.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"gmt-align {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_text, _) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


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
    from gmt_align.core.distributed import adopt_launcher_arguments, single_process_environment

    argv = adopt_launcher_arguments(list(sys.argv[1:] if argv is None else argv))
    parser = make_parser()
    if not argv:
        parser.print_help()
        return 2
    try:  # the command word alone: what follows it is the command's own
        command = parser.parse_args(argv[:1]).command
    except SystemExit as exit_:  # --help, --version, or a one-line error
        return int(exit_.code or 0)
    rest = argv[1:]
    if command != "report":
        _import_transformers_quietly()
    module = COMMANDS[command][1]
    if module is not None:
        return import_module(module, __package__).main(rest)
    from .common import RecipeError
    from .launch import split_launch_options

    try:  # --accelerate_config / --num_processes: start this command again under accelerate launch
        launch_options, rest = split_launch_options(rest)
    except RecipeError as error:
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 2
    if launch_options:
        return _launch(command, launch_options, rest)
    # No launcher: DeepSpeed would look for MPI; run as one rank instead. Taken back on return, so
    # that a caller in the same process (a test) does not hand these variables to its children.
    added = single_process_environment() if _asks_for_deepspeed(rest) else {}
    os.environ.update(added)
    try:
        return _run(command, rest)
    finally:
        for name in added:
            os.environ.pop(name, None)


def _launch(command: str, options: dict[str, str], rest: list[str]) -> int:
    from .common import RecipeError
    from .launch import launch

    try:
        return launch(command, options, rest)
    except RecipeError as error:
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 2


def _run(command: str, rest: list[str]) -> int:
    from gmt_align.backends import UnsupportedOptimizerError
    from gmt_align.core.selection import NonFiniteGradientError
    from gmt_align.training.config import GMTSettingError
    from gmt_align.training.run_lock import release_run_folder
    from gmt_align.training.runs import RunFolderError
    from gmt_align.training.stats_file import TelemetryStateError
    from gmt_align.training.truncation import DataTruncationError

    from .data import DataError
    from .recipe import RecipeError, parse_recipe
    from .rewards import RewardError
    from .train import train

    if "WORLD_SIZE" in os.environ:  # set by every launcher, and by main() for a launcher-less DeepSpeed run
        # Before the recipe's TrainingArguments start the process group (DeepSpeed is imported later in
        # every distributed run, DDP's too): deepspeed.comm binds the group that exists when it is first
        # imported into default arguments (TorchBackend.barrier), where it outlives the run, its gloo
        # threads with it, into the interpreter's shutdown (see train.end_processes).
        import deepspeed.comm  # noqa: F401
    try:
        parsed = parse_recipe(command, rest)
    except RecipeError as error:
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 2
    try:
        train(command, *parsed)
    except (UnsupportedOptimizerError, GMTSettingError, RunFolderError, DataError, DataTruncationError,
            TelemetryStateError, RewardError) as error:
        # all raised before the first step
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as error:  # every rank stops here together; no weight was written
        print(f"gmt-align {command}: error: {error}", file=sys.stderr)
        return 1
    finally:  # parse_recipe held output_dir for the run; a caller in the same process (a test) goes on
        release_run_folder(parsed[1].output_dir)
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

