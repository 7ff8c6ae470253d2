"""A recipe: one flat YAML file plus command-line overrides, read as ``trl sft`` reads it, and every
problem that can be found before a model loads.

```python
script_args, training_args, model_args = parse_recipe("sft", ["--config", "recipe.yaml", "--max_steps", "2"])
```

Both commands that read recipes go through this module: ``gmt-align sft|dpo`` (:func:`parse_recipe`
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

from .data import DATA_FILE_FORMATS, data_source_problems
from .common import RecipeError, option_value

__all__ = [
    "METHODS",
    "GMTScriptArguments",
    "RecipeError",
    "config_class",
    "exclude_problems_before_loading",
    "fields",
    "make_parser",
    "override_value",
    "parse_recipe",
    "problems",
    "source_problems",
    "unknown_key",
]

METHODS = ("sft", "dpo")


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


def config_class(method: str):
    """The training arguments of ``method``: :class:`~gmt_align.training.config.GMTSFTConfig` or ``GMTDPOConfig``."""
    from gmt_align.training.config import GMTDPOConfig, GMTSFTConfig

    return {"sft": GMTSFTConfig, "dpo": GMTDPOConfig}[method]


def make_parser(method: str) -> TrlParser:
    """TRL's parser for (script, training, model) arguments. A field must be named in full: argparse
    would otherwise take ``--max_step`` for ``--max_steps`` (and a typo for whichever field it begins)."""
    return _Parser((GMTScriptArguments, config_class(method), ModelConfig), prog=f"gmt-align {method}",
                   allow_abbrev=False)


@functools.cache
def fields(method: str) -> frozenset[str]:
    """Every key a recipe of ``method`` may hold."""
    classes = (GMTScriptArguments, config_class(method), ModelConfig)
    return frozenset(f.name for cls in classes for f in dataclasses.fields(cls))


def unknown_key(key: str, method: str) -> str:
    """One line for a key ``method`` does not take: the other method's field, or the closest known one."""
    other = "dpo" if method == "sft" else "sft"
    if key in fields(other):
        return f"{key} is a {other.upper()} field, not an {method.upper()} one"
    close = difflib.get_close_matches(key, sorted(fields(method)), n=1, cutoff=0.8)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def override_value(method: str, key: str, value: str):
    """``--key value`` converted as the training command converts it (``RecipeError`` if it cannot be)."""
    try:
        namespace, rest = make_parser(method).parse_known_args([f"--{key}", value])
    except RecipeError:
        raise RecipeError(f"--{key}: invalid value {value!r}") from None
    if rest:
        raise RecipeError(f"unknown argument --{key}")
    return getattr(namespace, key)


def parse_recipe(method: str, argv: Sequence[str]) -> tuple:
    """Parse ``--config R.yaml`` plus overrides into (script, training, model) arguments, check them
    (:func:`problems`, then what the machine lacks) and prepare ``output_dir``; ``RecipeError`` on the
    first problem."""
    import yaml

    argv = list(argv)
    try:
        script_args, training_args, model_args, from_file, from_line = make_parser(method).parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except FileNotFoundError as error:
        raise RecipeError(f"no such file: {error.filename}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe is not valid YAML: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        raise RecipeError(" ".join(str(error).split())) from None
    unknown = [unknown_key(key[2:], method) for key in from_file[0::2]]  # pairs of --key, value
    unknown += [unknown_key(item[2:].split("=", 1)[0], method) for item in from_line if item.startswith("--")]
    if unknown or from_line:
        raise RecipeError("; ".join(unknown) or f"unexpected argument {from_line[0]!r}")

    from .environment import machine_problems

    found = problems(script_args, training_args, model_args, explicit=_explicit_keys(argv))
    found += machine_problems(training_args, model_args)
    if found:
        raise RecipeError(found[0])
    from gmt_align.training.runs import RunFolderError, prepare_run_folder

    try:  # `true` becomes the newest complete checkpoint; a reused output_dir is refused
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        training_args.resume_from_checkpoint = prepare_run_folder(training_args, first_on_node)
    except RunFolderError as error:
        raise RecipeError(str(error)) from None
    return script_args, training_args, model_args


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

    found = source_problems(script_args, training_args, model_args) + fsdp_problems(training_args)
    found += exclude_problems_before_loading(training_args, model_args)
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
    elif _missing(name):
        found.append(f"model_name_or_path: no such directory {name} (quickstart model: make quickstart)")
    template = option_value(training_args, "chat_template_path")  # an SFT field
    if template and _missing(template):
        found.append(f"chat_template_path: no such file {template}")
    resume = option_value(training_args, "resume_from_checkpoint")  # a path, or true/false (YAML or command line)
    if isinstance(resume, str) and resume.strip().lower() not in BOOLEAN_WORDS and not Path(resume).expanduser().is_dir():
        found.append(f"resume_from_checkpoint: no such checkpoint directory {resume}")
    return found + model_option_problems(model_args)
