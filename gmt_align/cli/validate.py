"""``gmt-align validate RECIPE.yaml [...] [--method sft|dpo|grpo] [--here] [--field value ...]``: check first.

Reads a recipe and its DeepSpeed config as ``gmt-align sft|dpo|grpo`` would, loads neither model nor
data, and reports every problem at once, one per line, each prefixed with the file it comes from.
Overrides (``--deepspeed ds_configs/zero3.json``, ``--max_steps 3``, and ``--accelerate_config`` /
``--num_processes``) are read as the training command reads them, so a launch command can be checked
as it will run. Exit status: 0 (one ``OK`` line per
recipe), 1 (problems found), 2 (bad usage of the command).

What counts as a problem (each would otherwise stop or silently change a run, often after the
model has loaded):

- the recipe: unknown keys (with the closest known one), bad ``gmt_*`` values, values TRL or
  transformers reject, local paths that do not exist (hub ids are taken on trust: no network),
  evaluation and mixture settings that cannot work (:func:`gmt_align.cli.data.data_source_problems`),
  quantization without LoRA;
- the DeepSpeed config: what GMT refuses, DeepSpeed's own schema, values that contradict the recipe
  and combinations that would stop or silently change a run (:mod:`gmt_align.cli.deepspeed_checks`).

The checks are those ``gmt-align sft|dpo|grpo`` runs before loading (:mod:`gmt_align.cli.recipe`), which stop
at the first problem; here every problem is listed.

What this machine lacks for the recipe (:func:`gmt_align.cli.environment.machine_problems`: a GPU for
bf16, QLoRA or Liger; peft, bitsandbytes or liger-kernel) follows as ``on this machine:`` lines. They
are notes, since recipes are often checked on a login node for GPU nodes; with ``--here`` (the
recipe will run on this machine) they are problems.

The method (sft, dpo or grpo) is ``--method`` if given, else the one whose fields hold every key of the
recipe (``packing`` means sft, ``reward_funcs`` grpo, ``beta`` dpo or grpo), the method named last in the
file's path breaking a tie, else the first in the order sft, dpo, grpo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Report", "infer_method", "main", "validate_recipe"]

USAGE = """usage: gmt-align validate RECIPE.yaml [RECIPE.yaml ...] [--method sft|dpo|grpo] [--here] [--field value ...]

Checks recipes and their DeepSpeed config without loading a model or data, with any overrides the
training command would take (e.g. --deepspeed ds_configs/zero3.json). Prints one OK line per good
recipe, else every problem on its own line; then what this machine lacks for it ("on this machine:",
e.g. a GPU for bf16), which counts as a problem only with --here (the recipe will run here).
Exit status: 0 all good, 1 problems, 2 bad usage."""

_TRAINING_ONLY = {"deepspeed"}  # checked against the DeepSpeed JSON below, not by TrainingArguments
_PATHS = ("dataset_name", "dataset_prompt_column", "dataset_completion_column", "model_name_or_path",
          "chat_template_path", "resume_from_checkpoint")


@dataclass
class Report:
    """The outcome for one recipe: which method it was read as, and its problems (one line each)."""

    recipe: str
    method: str
    deepspeed: str | None = None
    problems: list[str] = field(default_factory=list)
    # What this machine lacks for the recipe (a GPU for bf16, a package): problems only with --here.
    machine: list[str] = field(default_factory=list)

    def lines(self, here: bool = False) -> list[str]:
        if self.problems or (here and self.machine):
            return self.problems + self.machine
        where = f", {self.deepspeed}" if self.deepspeed else ""
        return [f"OK {self.recipe} ({self.method}{where})", *self.machine]


def infer_method(recipe: dict, path: str | Path = "") -> str:
    """The method whose fields hold the recipe's keys, else the one its path names (see the module docstring)."""
    from .recipe import METHODS, fields

    known = set(recipe) & frozenset().union(*(fields(method) for method in METHODS))
    fitting = [method for method in METHODS if known <= fields(method)] or list(METHODS)
    name = Path(path).as_posix().lower()
    named = sorted((name.rfind(method), method) for method in fitting if method in name)
    return named[-1][1] if named else fitting[0]


def _gmt_problems(recipe: dict) -> dict[str, str]:
    """Each bad ``gmt_*`` value on its own (``validate_gmt`` stops at the first)."""
    from gmt_align.training.config import GMTArguments

    bad = {}
    for key in (k for k in recipe if k.startswith("gmt_") and k in {f.name for f in dataclasses.fields(GMTArguments)}):
        probe = GMTArguments(**{key: copy.deepcopy(recipe[key])})
        try:
            probe.validate_gmt()
        except ValueError as error:
            bad[key] = str(error)
    return bad


def _unknown_key(key: str, method: str) -> str:
    from .recipe import METHODS, fields, unknown_key

    other = next((other for other in METHODS if other != method and key in fields(other)), None)
    return unknown_key(key, method) + (f" (--method {other}?)" if other else "")


def _build_args(method: str, recipe: dict):
    """TRL's own parsing of the recipe (defaults from the mapping, as ``TrlParser`` does), on CPU terms:
    ``use_cpu`` is forced so that bf16 recipes for GPUs can be checked on a login node."""
    from .recipe import RecipeError, make_parser

    from gmt_align.training.config import parsing_for_another_machine

    parser = make_parser(method)
    with warnings.catch_warnings(), _one_process(), parsing_for_another_machine():
        warnings.simplefilter("ignore")
        try:
            parser.set_defaults_with_config(**{**recipe, "use_cpu": True})
            return parser.parse_args_into_dataclasses(args=[]), None
        except RecipeError as error:
            return None, str(error)
        except (ValueError, TypeError) as error:
            return None, " ".join(str(error).split())


# A launcher's (or a job script's) variables: TrainingArguments sets up its devices in __post_init__, and
# under these it would start a process group and wait for peers that never come.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "ACCELERATE_USE_DEEPSPEED")


@contextlib.contextmanager
def _one_process():
    """Parse as one process with no process group, whatever the environment (restored after)."""
    saved = {name: os.environ.pop(name) for name in _LAUNCHER_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _apply_overrides(recipe: dict, overrides: dict[str, str], method: str) -> list[str]:
    """Command-line values, converted by the training command's own parser (``--key value`` strings)."""
    from .recipe import RecipeError, override_value

    problems = []
    for key, value in overrides.items():
        try:
            recipe[key] = override_value(method, key, value)
        except RecipeError as error:
            problems.append(str(error))
    return problems


def validate_recipe(
    path: str | Path, deepspeed: str | None = None, method: str | None = None, overrides: dict[str, str] | None = None
) -> Report:
    """Every problem of one recipe and of its DeepSpeed config, with command-line ``overrides``
    (``deepspeed`` is one of them, given apart for convenience)."""
    import yaml

    from .common import yaml_error
    from .deepspeed_checks import deepspeed_problems, load_deepspeed_config
    from .environment import machine_problems
    from .recipe import RecipeError, fields, problems, source_problems

    recipe_name = str(path)
    report = Report(recipe_name, method or "sft")

    def problem(message: str, where: str = recipe_name) -> None:
        report.problems.append(f"{where}: {message}")

    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        problem("no such file")
        return report
    except yaml.YAMLError as error:
        report.problems.append(yaml_error(recipe_name, error))
        return report
    if not isinstance(recipe, dict):
        problem("a recipe must be a YAML mapping of field: value")
        return report
    overrides = {**(overrides or {}), **({"deepspeed": deepspeed} if deepspeed is not None else {})}
    report.method = method = method or infer_method({**recipe, **overrides}, path)
    if "dataset_name" in overrides and "datasets" not in overrides:
        recipe.pop("datasets", None)  # as gmt-align sft|dpo: the command line's file replaces the recipe's mixture
    for message in _apply_overrides(recipe, overrides, method):
        problem(message)

    env = recipe.pop("env", {})
    if not isinstance(env, dict):
        problem("env must be a mapping of environment variable: value")
    for key in [k for k in recipe if k not in fields(method)]:
        problem(_unknown_key(key, method))
        del recipe[key]
    for key, message in _gmt_problems(recipe).items():
        problem(message)
        del recipe[key]
    if recipe.get("bf16") is True and recipe.get("fp16") is True:
        problem("bf16 and fp16 are both true: choose one")
        del recipe["fp16"]  # so that the remaining checks still run
    ds_source = recipe.get("deepspeed")

    paths = {k: recipe[k] for k in _PATHS if k in recipe}
    raw = {**recipe, **{k: v if v is None or isinstance(v, (str, bool)) else str(v) for k, v in paths.items()}}
    # On the raw values: the recipe is parsed as on CPU (bf16 would be refused), and one TRL cannot parse
    # still has its paths checked.
    report.machine = [f"{recipe_name}: on this machine: {message}" for message in machine_problems(raw, raw, raw)]
    parsed, error = _build_args(method, {k: v for k, v in recipe.items() if k not in _TRAINING_ONLY})
    # The checks the training command runs; the DeepSpeed config's below, where its problems name its file.
    for message in problems(*parsed[:3]) if parsed else source_problems(raw, raw, raw):
        problem(message)
    if error:  # what TRL or transformers refuse, after what the recipe names (their errors may follow from it)
        problem(error)
    if parsed:
        notes = _run_folder_notes(parsed[1], ds_source)
        report.machine += [f"{recipe_name}: on this machine: {message}" for message in notes]

    if ds_source:
        report.deepspeed = ds_source if isinstance(ds_source, str) else f"{recipe_name} (inline deepspeed)"
        try:
            config = load_deepspeed_config(ds_source)
        except RecipeError as error:
            problem(str(error))
        else:
            for message in deepspeed_problems(config, parsed[1] if parsed else None, explicit=recipe):
                problem(message, report.deepspeed)
            stage = (config.get("zero_optimization") or {}).get("stage", 0)
            report.deepspeed += f": ZeRO-{stage}"
    return report


def _run_folder_notes(training_args, deepspeed=None) -> list[str]:
    """What the run would refuse given the folders as they are now (``output_dir`` in use by a live run,
    or already holding a run; no complete checkpoint to resume from, or one this run cannot load): a
    note, since they may change before it runs. The launch's number of processes is not known here."""
    from gmt_align.training.run_lock import in_use
    from gmt_align.training.runs import RunFolderError, prepare_run_folder

    busy = in_use(training_args.output_dir)
    if busy:
        return [busy]
    training_args.deepspeed = deepspeed  # parsed apart (_TRAINING_ONLY); decides which checkpoints it can resume
    try:
        prepare_run_folder(training_args, first_on_node=False)  # never removes anything
    except RunFolderError as error:
        return [str(error)]
    return []


def main(argv: Sequence[str]) -> int:
    # DeepSpeed is imported for its config schema only; without this it probes for an accelerator
    # and prints a warning on a machine that has none (a login node).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .common import RecipeError
    from .launch import launch_option_problems, split_launch_options

    recipes, method, overrides, here = [], None, {}, False
    try:  # --accelerate_config / --num_processes: checked as the training command checks them
        launch_options, argv = split_launch_options(argv)
    except RecipeError as error:
        print(f"gmt-align validate: error: {error}", file=sys.stderr)
        return 2
    while argv:
        arg = argv.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            return 0
        if arg == "--here":
            here = True
            continue
        if not arg.startswith("--"):
            recipes.append(arg)
            continue
        key, _, value = arg[2:].partition("=")
        if not value:  # `--key value`, or a bare boolean flag `--key`
            value = argv.pop(0) if argv and not argv[0].startswith("--") else "true"
        if key == "method":
            from .recipe import METHODS

            if value not in METHODS:
                print(f"gmt-align validate: error: --method must be one of {', '.join(METHODS)}, got {value!r}",
                      file=sys.stderr)
                return 2
            method = value
        else:
            overrides[key] = value
    if not recipes:
        print(USAGE, file=sys.stderr)
        return 2
    status = 0
    for recipe in recipes:
        report = validate_recipe(recipe, method=method, overrides=overrides)
        report.problems += [f"{recipe}: {message}" for message in launch_option_problems(launch_options)]
        print("\n".join(report.lines(here)))
        status = max(status, 1 if report.problems or (here and report.machine) else 0)
    return status
