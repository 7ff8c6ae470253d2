"""``gmt-align validate RECIPE.yaml [...] [--method sft|dpo] [--here] [--field value ...]``: check before queueing.

Reads a recipe and its DeepSpeed config as ``gmt-align sft|dpo`` would, loads neither model nor
data, and reports every problem at once, one per line, each prefixed with the file it comes from.
Overrides (``--deepspeed ds_configs/zero3.json``, ``--max_steps 3``) are read as ``gmt-align sft|dpo``
reads them, so a launch command can be checked as it will run. Exit status: 0 (one ``OK`` line per
recipe), 1 (problems found), 2 (bad usage of the command).

What counts as a problem (each would otherwise stop or silently change a run, often after the
model has loaded):

- the recipe: unknown keys (with the closest known one), bad ``gmt_*`` values, values TRL or
  transformers reject, local paths that do not exist (hub ids are taken on trust: no network),
  evaluation and mixture settings that cannot work (:func:`gmt_align.data.data_source_problems`),
  quantization without LoRA;
- the DeepSpeed config: what GMT refuses (``adapters.zero.REFUSALS``), unknown or invalid
  ``zero_optimization`` keys (DeepSpeed's own schema), explicit values that contradict the recipe
  (transformers' own matching: batch size, accumulation, clipping, optimizer, fp16/bf16);
- combinations: fp16 with bf16; ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``
  (``gmt-align`` ends by saving a plain HF model, which ZeRO-3 then cannot write: an error, not a
  warning); optimizer offload with the Trainer's own optimizer and ``zero_force_ds_cpu_optimizer``
  left true; ``offload_param`` below ZeRO-3; fp16/bf16 without ZeRO (DeepSpeed's FP16 optimizers,
  which GMT cannot see into); a JSON ``optimizer``/``scheduler`` block next to a recipe's ``optim``
  / ``lr_scheduler_type``, which it would silently override.

What this machine lacks for the recipe (:func:`gmt_align.environment.machine_problems`: a GPU for
bf16, QLoRA or Liger; peft, bitsandbytes or liger-kernel) follows as ``on this machine:`` lines. They
are notes, since recipes are often checked on a login node for GPU nodes; with ``--here`` (the
recipe will run on this machine) they are problems.

The method (sft or dpo) is ``--method`` if given, else the recipe's own keys (``beta`` and other
DPO-only fields mean dpo; ``packing`` and other SFT-only fields mean sft), else ``dpo`` in the
file's path, else sft.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Report", "infer_method", "main", "validate_recipe"]

USAGE = """usage: gmt-align validate RECIPE.yaml [RECIPE.yaml ...] [--method sft|dpo] [--here] [--field value ...]

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


@functools.cache
def _fields(method: str) -> frozenset[str]:
    from trl import ModelConfig

    from .train import GMTScriptArguments, _config_class

    classes = (GMTScriptArguments, _config_class(method), ModelConfig)
    return frozenset(f.name for cls in classes for f in dataclasses.fields(cls))


def infer_method(recipe: dict, path: str | Path = "") -> str:
    """sft or dpo, from the recipe's method-specific keys, else its path (see the module docstring)."""
    sft_only, dpo_only = _fields("sft") - _fields("dpo"), _fields("dpo") - _fields("sft")
    keys = set(recipe)
    if keys & dpo_only and not keys & sft_only:
        return "dpo"
    if keys & sft_only and not keys & dpo_only:
        return "sft"
    return "dpo" if "dpo" in Path(path).as_posix().lower() else "sft"


def _gmt_problems(recipe: dict) -> dict[str, str]:
    """Each bad ``gmt_*`` value on its own (``validate_gmt`` stops at the first)."""
    from .config import GMTArguments

    bad = {}
    for key in (k for k in recipe if k.startswith("gmt_") and k in {f.name for f in dataclasses.fields(GMTArguments)}):
        probe = GMTArguments(**{key: copy.deepcopy(recipe[key])})
        try:
            probe.validate_gmt()
        except ValueError as error:
            bad[key] = str(error)
    return bad


def _unknown_key(key: str, known: set[str], method: str) -> str:
    other = "dpo" if method == "sft" else "sft"
    if key in _fields(other):
        return f"{key} is a {other.upper()} field, but this recipe is read as {method.upper()} (--method {other}?)"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _build_args(method: str, recipe: dict):
    """TRL's own parsing of the recipe (defaults from the mapping, as ``TrlParser`` does), on CPU terms:
    ``use_cpu`` is forced so that bf16 recipes for GPUs can be checked on a login node."""
    from .train import RecipeError, _one_line, make_parser

    parser = make_parser(method)
    with warnings.catch_warnings(), _one_process():
        warnings.simplefilter("ignore")
        try:
            parser.set_defaults_with_config(**{**recipe, "use_cpu": True})
            return parser.parse_args_into_dataclasses(args=[]), None
        except RecipeError as error:
            return None, str(error)
        except (ValueError, TypeError) as error:
            return None, _one_line(str(error))


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


_MISMATCH = re.compile(r"- ds (\S+)=(.*) vs hf (\S+)=(.*)")


def zero_config(config: dict) -> tuple[list[str], object | None]:
    """DeepSpeed's own schema for ``zero_optimization`` (unknown keys, bad values): the problems, one
    line each, and the parsed ``DeepSpeedZeroConfig`` (None if invalid)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return ["zero_optimization must be a JSON object"], None
    try:
        return [], DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                what = "unknown key"
            elif where == "stage":  # pydantic lists the enum's values with an alias: "0, 1, 2, 3 or 3"
                what = f"{item.get('input')!r} is not a ZeRO stage (0, 1, 2 or 3)"
            else:
                what = f"{item['msg']} (got {item.get('input')!r})"
            problems.append(f"zero_optimization.{where}: {what}")
        return problems, None


def _zero_optimizer_problems(args) -> list[str]:
    """The optimizer the Trainer would build, as DeepSpeed's ZeRO sees it (it asserts on others)."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    from transformers import Trainer

    name = getattr(args.optim, "value", args.optim)
    try:
        optimizer_class, _ = Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError, TypeError, AttributeError) as error:
        return [f"optim {name}: {' '.join(str(error).split())}"]
    if optimizer_class in ZERO_SUPPORTED_OPTIMIZERS:
        return []
    return [(f"optim {name} builds {optimizer_class.__name__}, which ZeRO refuses unless the JSON sets "
             "\"zero_allow_untested_optimizer\": true")]


def deepspeed_problems(config: dict, args, recipe: dict) -> list[str]:
    """Problems of a DeepSpeed config, alone and next to the recipe's resolved arguments."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from .train import deepspeed_refusals

    problems = deepspeed_refusals(config)  # what GMT refuses, and DeepSpeed's schema
    if not isinstance(config.get("zero_optimization") or {}, dict):
        return problems
    _, zero = zero_config(config)
    stage = int(zero.stage) if zero is not None else None  # None: invalid, reported above

    if args is not None:
        resolved = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolved.trainer_config_process(args)  # args were built as one process: world size 1
        for line in resolved.mismatches:
            match = _MISMATCH.match(line)
            if match and match.group(1) != "train_batch_size":  # depends on the world size: below
                ds_key, ds_value, hf_key, hf_value = match.groups()
                problems.append(f"{ds_key}={ds_value} contradicts the recipe's {hf_key}={hf_value} "
                                f"(set it to \"auto\" to take the recipe's)")
        total = config.get("train_batch_size", "auto")
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if total != "auto" and (not isinstance(total, int) or total % per_step):
            problems.append(f"train_batch_size={total} is not a multiple of per_device_train_batch_size x "
                            f"gradient_accumulation_steps = {per_step}: no number of processes gives it")
        fp16, bf16 = resolved.is_true("fp16.enabled"), resolved.is_true("bf16.enabled")
        if fp16 and bf16:
            problems.append("fp16 and bf16 are both enabled (DeepSpeed refuses both at once)")
        if stage and not config.get("optimizer") and not config.get("zero_allow_untested_optimizer"):
            problems += _zero_optimizer_problems(args)
        if stage == 0 and (fp16 or bf16):
            problems.append(f"{'fp16' if fp16 else 'bf16'} without ZeRO uses DeepSpeed's FP16/BF16 optimizer "
                            "wrapper, which GMT cannot mask inside: use zero_optimization.stage 1, 2 or 3")
    if config.get("optimizer") and "optim" in recipe:
        problems.append(f"the JSON's optimizer block replaces the recipe's optim: {recipe['optim']} "
                        "(remove one of them)")
    if config.get("scheduler") and "lr_scheduler_type" in recipe:
        problems.append(f"the JSON's scheduler block replaces the recipe's lr_scheduler_type: "
                        f"{recipe['lr_scheduler_type']} (remove one of them)")
    if zero is not None:
        if stage == 3 and not zero.gather_16bit_weights_on_model_save:
            problems.append("ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save: true "
                            "saves no model transformers can load (gmt-align saves one at the end): set it true")
        offload_optimizer = zero.offload_optimizer
        if (offload_optimizer is not None and offload_optimizer.device == "cpu"
                and not config.get("optimizer") and config.get("zero_force_ds_cpu_optimizer", True) is not False):
            problems.append("offload_optimizer with the Trainer's own optimizer needs "
                            "\"zero_force_ds_cpu_optimizer\": false (or a JSON optimizer block), "
                            "else DeepSpeed refuses it at start-up")
        if zero.offload_param is not None and stage != 3:
            problems.append(f"zero_optimization.offload_param has no effect at ZeRO stage {stage} (only ZeRO-3 "
                            "offloads parameters)")
    return problems


def _apply_overrides(recipe: dict, overrides: dict[str, str], method: str) -> list[str]:
    """Command-line values, converted by the training command's own parser (``--key value`` strings)."""
    from .train import make_parser

    actions = make_parser(method)._option_string_actions
    problems = []
    for key, value in overrides.items():
        action = actions.get(f"--{key}")
        if action is None:
            problems.append(f"unknown argument --{key}")
            continue
        try:
            recipe[key] = action.type(value) if action.type else value
        except (TypeError, ValueError):
            problems.append(f"--{key}: invalid value {value!r}")
    return problems


def validate_recipe(
    path: str | Path, deepspeed: str | None = None, method: str | None = None, overrides: dict[str, str] | None = None
) -> Report:
    """Every problem of one recipe and of its DeepSpeed config, with command-line ``overrides``
    (``deepspeed`` is one of them, given apart for convenience)."""
    import yaml

    from .environment import machine_problems
    from .train import RecipeError, exclude_problems_before_loading, load_deepspeed_config, source_problems

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
        problem(f"not valid YAML: {str(error).splitlines()[0]}")
        return report
    if not isinstance(recipe, dict):
        problem("a recipe must be a YAML mapping of field: value")
        return report
    overrides = {**(overrides or {}), **({"deepspeed": deepspeed} if deepspeed is not None else {})}
    report.method = method = method or infer_method({**recipe, **overrides}, path)
    for message in _apply_overrides(recipe, overrides, method):
        problem(message)

    env = recipe.pop("env", {})
    if not isinstance(env, dict):
        problem("env must be a mapping of environment variable: value")
    known = _fields(method)
    for key in [k for k in recipe if k not in known]:
        problem(_unknown_key(key, known, method))
        del recipe[key]
    for key, message in _gmt_problems(recipe).items():
        problem(message)
        del recipe[key]
    if recipe.get("bf16") is True and recipe.get("fp16") is True:
        problem("bf16 and fp16 are both true: choose one")
        del recipe["fp16"]  # so that the remaining checks still run
    ds_source = recipe.get("deepspeed")

    # On the raw values, so that a recipe TRL cannot parse still has its paths checked.
    paths = {k: recipe[k] for k in _PATHS if k in recipe}
    raw = {**recipe, **{k: v if v is None or isinstance(v, (str, bool)) else str(v) for k, v in paths.items()}}
    for message in source_problems(raw, raw, raw):
        problem(message)
    report.machine = [f"{recipe_name}: on this machine: {message}" for message in machine_problems(raw, raw)]
    from .adapters.fsdp2 import fsdp_problems

    parsed, error = _build_args(method, {k: v for k, v in recipe.items() if k not in _TRAINING_ONLY})
    if error:
        problem(error)
    if parsed:
        _, training_args, model_args = parsed[:3]
        for message in exclude_problems_before_loading(training_args, model_args) + fsdp_problems(training_args):
            problem(message)
        report.machine += [f"{recipe_name}: on this machine: {message}" for message in _run_folder_notes(training_args)]

    if ds_source:
        report.deepspeed = ds_source if isinstance(ds_source, str) else f"{recipe_name} (inline deepspeed)"
        try:
            config = load_deepspeed_config(ds_source)
        except RecipeError as error:
            problem(str(error))
        else:
            for message in deepspeed_problems(config, parsed[1] if parsed else None, recipe):
                problem(message, report.deepspeed)
            stage = (config.get("zero_optimization") or {}).get("stage", 0)
            report.deepspeed += f": ZeRO-{stage}"
    return report


def _run_folder_notes(training_args) -> list[str]:
    """What the run would refuse given the folders as they are now (``output_dir`` already holding a
    run, no complete checkpoint to resume from): a note, since they may change before it runs."""
    from .runs import RunFolderError, prepare_run_folder

    try:
        prepare_run_folder(training_args, first_on_node=False)  # never removes anything
    except RunFolderError as error:
        return [str(error)]
    return []


def main(argv: Sequence[str]) -> int:
    # DeepSpeed is imported for its config schema only; without this it probes for an accelerator
    # and prints a warning on a machine that has none (a login node).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    recipes, method, overrides, here = [], None, {}, False
    argv = list(argv)
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
            if value not in ("sft", "dpo"):
                print(f"gmt-align validate: error: --method must be sft or dpo, got {value!r}", file=sys.stderr)
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
        print("\n".join(report.lines(here)))
        status = max(status, 1 if report.problems or (here and report.machine) else 0)
    return status
