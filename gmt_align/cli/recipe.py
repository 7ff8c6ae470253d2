"""A recipe: one flat YAML file plus command-line overrides, read as ``trl sft`` reads it, and every
problem that can be found before a model loads.

```python
script_args, training_args, model_args = parse_recipe("sft", ["--config", "recipe.yaml", "--max_steps", "2"])
```

Both commands that read recipes go through this module: ``gmt-align sft|dpo|grpo`` (:func:`parse_recipe`
stops at the first problem, one line) and ``gmt-align validate`` (every problem of a recipe at once,
from :func:`problems`, :func:`source_problems`, :func:`unknown_key` and :func:`override_value`). The
DeepSpeed JSON is checked by :mod:`gmt_align.cli.deepspeed_checks`; what the machine lacks, by
:func:`gmt_align.cli.environment.machine_problems`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser
from trl.scripts.grpo import GRPOScriptArguments

from .data import DATA_FILE_FORMATS, data_source_problems
from .common import RecipeError, option_value, unwritable_problem, weights_problem, yaml_error

__all__ = [
    "METHODS",
    "GMTGRPOScriptArguments",
    "GMTScriptArguments",
    "RecipeError",
    "config_class",
    "exclude_problems_before_loading",
    "fields",
    "make_parser",
    "override_value",
    "parse_recipe",
    "problems",
    "script_class",
    "source_problems",
    "unknown_key",
]

METHODS = ("sft", "dpo", "grpo")


class _Parser(TrlParser):
    def error(self, message: str):  # argparse prints the whole usage; one line is enough
        raise RecipeError(message)


@dataclass
class GMTScriptArguments(ScriptArguments, DatasetMixtureConfig):
    """TRL's ``ScriptArguments`` and dataset mixture (``datasets``, ``streaming``, ``test_split_size``:
    what ``trl sft`` parses), plus a mapping for instruction/response datasets.

    Many datasets of the paper's setups (Magicoder-Evol-Instruct, MetaMathQA) hold two text columns
    rather than TRL's formats; naming them turns each row into TRL's conversational
    prompt/completion (one user turn, one assistant turn), so the chat template shapes the prompt
    and the loss covers the completion only. How the data and the evaluation split are read:
    :mod:`gmt_align.cli.data`.
    """

    dataset_prompt_column: str | None = field(
        default=None,
        metadata={"help": "Text column that becomes the user turn of TRL's conversational prompt/completion "
                  "(with dataset_completion_column); other columns are dropped."},
    )
    dataset_completion_column: str | None = field(
        default=None, metadata={"help": "Text column that becomes the assistant turn (see dataset_prompt_column)."}
    )
    eval_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "The benchmarks of this recipe, as lm-evaluation-harness task or group names: what "
                  "`gmt-align eval --config RECIPE` runs on its output_dir. Training does not read them."},
    )

    def __post_init__(self):
        """Mixture entries checked as TRL would at load time (or with a TypeError), in one line each."""
        from trl.scripts.utils import DatasetConfig

        keys = [f.name for f in dataclasses.fields(DatasetConfig)]
        if not isinstance(self.datasets, list):
            raise ValueError("datasets must be a list of entries (path: ..., and optionally "
                             f"{', '.join(keys[1:])})")
        for index, entry in enumerate(self.datasets):
            if isinstance(entry, DatasetConfig):
                continue
            if not isinstance(entry, dict) or "path" not in entry:
                raise ValueError(f"datasets[{index}] must be a mapping with a path (a hub dataset, a builder such "
                                 f"as json, or a local file), got {entry!r}")
            unknown = [key for key in entry if key not in keys]
            if unknown:
                raise ValueError(f"datasets[{index}]: unknown key(s) {', '.join(unknown)} (an entry takes "
                                 f"{', '.join(keys)})")
        super().__post_init__()
        fractions = [entry.fraction is not None for entry in self.datasets]
        if any(fractions) and not all(fractions):
            raise ValueError("datasets: fraction must be set for every entry or for none")


@dataclass
class GMTGRPOScriptArguments(GMTScriptArguments, GRPOScriptArguments):
    """:class:`GMTScriptArguments` plus what ``trl grpo`` adds: ``reward_funcs`` (names, resolved by
    :mod:`gmt_align.cli.rewards`) and ``reward_model_name_or_path``."""


def config_class(method: str):
    """The training arguments of ``method``: :class:`~gmt_align.training.config.GMTSFTConfig`, ``GMTDPOConfig``
    or ``GMTGRPOConfig``."""
    from gmt_align.training.config import GMTDPOConfig, GMTGRPOConfig, GMTSFTConfig

    return {"sft": GMTSFTConfig, "dpo": GMTDPOConfig, "grpo": GMTGRPOConfig}[method]


def script_class(method: str) -> type:
    """The script arguments of ``method``: those of ``trl sft`` / ``trl dpo``, or ``trl grpo``'s."""
    return GMTGRPOScriptArguments if method == "grpo" else GMTScriptArguments


def make_parser(method: str) -> TrlParser:
    """TRL's parser for (script, training, model) arguments. A field must be named in full: argparse
    would otherwise take ``--max_step`` for ``--max_steps`` (and a typo for whichever field it begins)."""
    return _Parser((script_class(method), config_class(method), ModelConfig), prog=f"gmt-align {method}",
                   allow_abbrev=False, epilog="launch options, as trl takes them: --accelerate_config NAME|PATH "
                   "(zero2, zero3, fsdp2, multi_gpu, or an accelerate config file) and --num_processes N start this "
                   "command again under accelerate launch (gmt_align.cli.launch)")


@functools.cache
def fields(method: str) -> frozenset[str]:
    """Every key a recipe of ``method`` may hold."""
    classes = (script_class(method), config_class(method), ModelConfig)
    return frozenset(f.name for cls in classes for f in dataclasses.fields(cls))


def unknown_key(key: str, method: str) -> str:
    """One line for a key ``method`` does not take: another method's field, a renamed key, or the closest one."""
    from .option_checks import RENAMED

    other = next((other for other in METHODS if other != method and key in fields(other)), None)
    if other:
        return f"{key} is {_a(other)} field, not {_a(method)} one"
    if RENAMED.get(key) in fields(method):
        return f"unknown key {key!r} (TRL and transformers renamed it {RENAMED[key]!r})"
    close = difflib.get_close_matches(key, sorted(fields(method)), n=1, cutoff=0.8)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _a(method: str) -> str:
    """The method's name with its article, as it is read aloud: "an SFT", "a DPO", "a GRPO"."""
    return f"{'an' if method == 'sft' else 'a'} {method.upper()}"


def override_value(method: str, key: str, value: str):
    """``--key value`` converted as the training command converts it (``RecipeError`` if it cannot be)."""
    try:
        namespace, rest = make_parser(method).parse_known_args([f"--{key}", value])
    except RecipeError:
        raise RecipeError(f"--{key}: invalid value {value!r}") from None
    if rest:
        raise RecipeError(f"unknown argument --{key}")
    return getattr(namespace, key)


def parse_recipe(method: str, argv: Sequence[str], launching: bool = False) -> tuple:
    """Parse ``--config R.yaml`` plus overrides into (script, training, model) arguments, check them
    (:func:`problems`, then what the machine lacks, then what one process cannot do), hold ``output_dir`` for
    this process's life (or until :func:`gmt_align.training.run_lock.release_run_folder`) and prepare it;
    ``RecipeError`` on the first problem. ``launching``: this process only starts the ranks
    (``--accelerate_config``), so ``output_dir`` is checked, not held or prepared (the ranks do both)."""
    import yaml

    argv = list(argv)
    deepspeed = _deepspeed_file(argv)
    if deepspeed:  # transformers reads it while parsing, and its JSON errors name no file
        from .deepspeed_checks import load_deepspeed_config

        load_deepspeed_config(deepspeed)
    try:
        script_args, training_args, model_args, from_file, from_line = make_parser(method).parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except FileNotFoundError as error:
        raise RecipeError(f"no such file: {error.filename}") from None
    except yaml.YAMLError as error:
        raise RecipeError(yaml_error(_config_path(argv), error)) from None
    except ValueError as error:
        raise RecipeError(" ".join(str(error).split())) from None
    unknown = [unknown_key(key[2:], method) for key in from_file[0::2]]  # pairs of --key, value
    unknown += [unknown_key(item[2:].split("=", 1)[0], method) for item in from_line if item.startswith("--")]
    if unknown or from_line:
        raise RecipeError("; ".join(unknown) or f"unexpected argument {from_line[0]!r}")

    on_line = {item.split("=", 1)[0] for item in argv}
    if "--dataset_name" in on_line and "--datasets" not in on_line:
        script_args.datasets = []  # a file on the command line replaces the recipe's mixture (as any override)

    from .environment import machine_problems
    from .option_checks import one_process_problems

    found = problems(script_args, training_args, model_args, explicit=_explicit_keys(argv))
    found += machine_problems(training_args, model_args, script_args)
    if not launching:
        found += one_process_problems(training_args)
    unwritable = unwritable_problem("output_dir", training_args.output_dir)  # this run's folder, on this machine
    found += [unwritable] if unwritable else []
    if launching:
        from gmt_align.training.run_lock import in_use

        busy = in_use(training_args.output_dir)
        found += [busy] if busy else []
    if found:
        raise RecipeError(found[0])
    from gmt_align.training.run_lock import claim_run_folder, release_run_folder
    from gmt_align.training.runs import RunFolderError, prepare_run_folder

    took = False
    try:  # held for the run's life; `true` becomes the newest complete checkpoint; a reused folder is refused
        took = not launching and claim_run_folder(training_args)
        first_on_node = not launching and int(os.environ.get("LOCAL_RANK", "0")) == 0
        resume = prepare_run_folder(training_args, first_on_node,
                                    world_size=None if launching else training_args.world_size)
        if not launching:
            training_args.resume_from_checkpoint = resume
    except RunFolderError as error:
        if took:
            release_run_folder(training_args.output_dir)
        raise RecipeError(str(error)) from None
    return script_args, training_args, model_args


def _config_path(argv: list[str]) -> str | None:
    """The ``--config`` file of a command line."""
    for index, item in enumerate(argv):
        if item.startswith("--config="):
            return item.split("=", 1)[1]
        if item == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _deepspeed_file(argv: list[str]) -> str | None:
    """The DeepSpeed JSON a command line names (its last ``--deepspeed``, else the recipe's ``deepspeed``),
    if it is an existing file (a missing one is said by :func:`source_problems`' checks)."""
    import yaml

    found = None
    for index, item in enumerate(argv):
        if item.startswith("--deepspeed="):
            found = item.split("=", 1)[1]
        elif item == "--deepspeed" and index + 1 < len(argv):
            found = argv[index + 1]
    if found is None and _config_path(argv):
        try:
            recipe = yaml.safe_load(Path(_config_path(argv)).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):  # the parser says what is wrong with it
            return None
        found = recipe.get("deepspeed") if isinstance(recipe, dict) else None
    return found if isinstance(found, str) and Path(found).expanduser().is_file() else None


def _explicit_keys(argv: list[str]) -> set[str]:
    """The keys a recipe and its command line set themselves (not left to a default)."""
    import yaml

    keys = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")} - {"config"}
    if "--config" in argv:
        with open(argv[argv.index("--config") + 1]) as recipe:  # read (and checked) by the parser already
            keys |= set(yaml.safe_load(recipe))
    return keys


def problems(script_args, training_args, model_args, explicit: Iterable[str] = ()) -> list[str]:
    """Every problem of parsed arguments that can be found before loading, one line each: what the
    recipe names, FSDP settings, ``gmt_exclude`` patterns, then the DeepSpeed config (``explicit``: the
    keys the recipe sets itself, which a JSON ``optimizer``/``scheduler`` block would override)."""
    from gmt_align.backends.fsdp2 import fsdp_problems

    from .option_checks import lora_target_problems, sft_option_problems, template_problems

    found = source_problems(script_args, training_args, model_args) + fsdp_problems(training_args)
    found += exclude_problems_before_loading(training_args, model_args) + sft_option_problems(training_args)
    found += template_problems(training_args, model_args) + lora_target_problems(training_args, model_args)
    if training_args.deepspeed:
        from .deepspeed_checks import deepspeed_problems, load_deepspeed_config

        try:
            config = load_deepspeed_config(training_args.deepspeed)
        except RecipeError as error:
            return found + [str(error)]
        found += deepspeed_problems(config, training_args, set(explicit))
    return found


def exclude_problems_before_loading(training_args, model_args) -> list[str]:
    """``gmt_exclude`` patterns that match nothing or leave nothing to mask, from the model's config
    (a local directory, or a hub id already cached); with LoRA the trainer checks them at start-up."""
    if training_args.gmt_mask_ratio == 0 or getattr(model_args, "use_peft", False):
        return []
    from gmt_align.training.config import exclude_problems_from_config

    return exclude_problems_from_config(training_args.gmt_exclude, model_args.model_name_or_path,
                                        revision=model_args.model_revision,
                                        trust_remote_code=training_args.trust_remote_code)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (*DATA_FILE_FORMATS, ".jinja", ".j2")


def _missing(path: str) -> bool:
    return _looks_local(path) and not Path(path).expanduser().exists()


def _model_folder_problem(key: str, name, hint: str = "") -> str | None:
    """A model named by a local path that does not exist, or a folder whose safetensors files cannot be
    read, in one line; a hub id is taken on trust."""
    if not isinstance(name, str):
        return None
    if _missing(name):
        return f"{key}: no such directory {name}{hint}"
    if Path(name).expanduser().is_dir() and (problem := weights_problem(name)):
        return f"{key}: {problem}"
    return None


def source_problems(script_args, training_args, model_args) -> list[str]:
    """Everything a recipe names that must exist or fit together before training: one line per problem.

    A hub id is taken on trust (no network is needed to validate); a local path must exist. The
    arguments may be parsed dataclasses or one raw recipe mapping (``gmt-align validate``).
    """
    from gmt_align.training.runs import BOOLEAN_WORDS

    from .environment import model_option_problems

    found = data_source_problems(script_args, training_args)
    prompt, completion = (option_value(script_args, key) for key in ("dataset_prompt_column", "dataset_completion_column"))
    if (prompt is None) != (completion is None):
        found.append("dataset_prompt_column and dataset_completion_column go together: set both or neither")
    name = option_value(model_args, "model_name_or_path")
    if not name:
        found.append("model_name_or_path is required")
    elif problem := _model_folder_problem("model_name_or_path", name, " (quickstart model: make quickstart)"):
        found.append(problem)
    template = option_value(training_args, "chat_template_path")  # an SFT field
    if template and _missing(template):
        found.append(f"chat_template_path: no such file {template}")
    resume = option_value(training_args, "resume_from_checkpoint")  # a path, or true/false (YAML or command line)
    if isinstance(resume, str) and resume.strip().lower() not in BOOLEAN_WORDS and not Path(resume).expanduser().is_dir():
        found.append(f"resume_from_checkpoint: no such checkpoint directory {resume}")
    reward_model = option_value(script_args, "reward_model_name_or_path")  # a GRPO field
    if reward_model and (problem := _model_folder_problem("reward_model_name_or_path", reward_model)):
        found.append(problem)
    from .rewards import reward_problems

    found += reward_problems(script_args, needs_one=isinstance(script_args, GMTGRPOScriptArguments))
    return found + model_option_problems(model_args)
