"""``gmt-align sft`` and ``gmt-align dpo``: one flat YAML recipe, any field overridable.

```bash
gmt-align sft --config recipes/quickstart/sft.yaml --max_steps 2 --gmt_mask_ratio 0.3
accelerate launch -m gmt_align.cli sft --config recipes/quickstart/sft.yaml
deepspeed --module gmt_align.cli dpo --config recipes/quickstart/dpo.yaml
```

Everything here runs before the model is loaded, except :func:`train`: a bad recipe fails in
seconds with one line, not after minutes of loading.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .data import DATA_FILE_FORMATS, DataError, data_source_problems, load_datasets, load_train_dataset, option_value

__all__ = [
    "METHODS",
    "GMTScriptArguments",
    "DataError",
    "RecipeError",
    "deepspeed_refusals",
    "load_datasets",
    "load_deepspeed_config",
    "load_train_dataset",
    "make_parser",
    "model_kwargs",
    "parse_recipe",
    "source_problems",
    "train",
]

METHODS = ("sft", "dpo")


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message is one line naming the culprit."""


class _Parser(TrlParser):
    def error(self, message: str):  # argparse prints the whole usage; one line is enough
        raise RecipeError(message)


def _config_class(method: str):
    from .config import GMTDPOConfig, GMTSFTConfig

    return {"sft": GMTSFTConfig, "dpo": GMTDPOConfig}[method]


@dataclass
class GMTScriptArguments(ScriptArguments, DatasetMixtureConfig):
    """TRL's ``ScriptArguments`` and dataset mixture (``datasets``, ``streaming``, ``test_split_size``:
    what ``trl sft`` parses), plus a mapping for instruction/response datasets.

    Many datasets of the paper's setups (Magicoder-Evol-Instruct, MetaMathQA) hold two text columns
    rather than TRL's formats; naming them turns each row into TRL's conversational
    prompt/completion (one user turn, one assistant turn), so the chat template shapes the prompt
    and the loss covers the completion only. How the data and the evaluation split are read:
    :mod:`gmt_align.data`.
    """

    dataset_prompt_column: str | None = field(
        default=None,
        metadata={"help": "Text column that becomes the user turn of TRL's conversational prompt/completion "
                  "(with dataset_completion_column); other columns are dropped."},
    )
    dataset_completion_column: str | None = field(
        default=None, metadata={"help": "Text column that becomes the assistant turn (see dataset_prompt_column)."}
    )

    def __post_init__(self):
        """Mixture entries checked as TRL would at load time (or with a TypeError), in one line each."""
        import dataclasses

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


def make_parser(method: str) -> TrlParser:
    return _Parser((GMTScriptArguments, _config_class(method), ModelConfig), prog=f"gmt-align {method}")


def parse_recipe(method: str, argv: Sequence[str]) -> tuple:
    """Parse ``--config R.yaml`` plus overrides into (script, training, model) arguments."""
    import yaml

    try:
        script_args, training_args, model_args = make_parser(method).parse_args_and_config(list(argv))
    except FileNotFoundError as error:
        raise RecipeError(f"no such file: {error.filename}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe is not valid YAML: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        raise RecipeError(_one_line(str(error))) from None
    from .adapters.fsdp2 import fsdp_problems
    from .environment import machine_problems

    for problems in (
        fsdp_problems(training_args),
        source_problems(script_args, training_args, model_args),
        machine_problems(training_args, model_args),
        deepspeed_refusals(load_deepspeed_config(training_args.deepspeed)) if training_args.deepspeed else [],
        exclude_problems_before_loading(training_args, model_args),
    ):
        if problems:
            raise RecipeError(problems[0])
    from .runs import RunFolderError, prepare_run_folder

    try:  # `true` becomes the newest complete checkpoint; a reused output_dir is refused
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        training_args.resume_from_checkpoint = prepare_run_folder(training_args, first_on_node)
    except RunFolderError as error:
        raise RecipeError(str(error)) from None
    return script_args, training_args, model_args


def exclude_problems_before_loading(training_args, model_args) -> list[str]:
    """``gmt_exclude`` patterns that match nothing or leave nothing to mask, from the model's config
    (a local directory, or a hub id already cached); with LoRA the trainer checks them at start-up."""
    if training_args.gmt_mask_ratio == 0 or getattr(model_args, "use_peft", False):
        return []
    from .config import exclude_problems_from_config

    return exclude_problems_from_config(training_args.gmt_exclude, model_args.model_name_or_path,
                                        revision=model_args.model_revision,
                                        trust_remote_code=training_args.trust_remote_code)


def _one_line(message: str) -> str:
    """Say which keys are unknown, in the words of our recipes rather than of argparse."""
    for marker, what in (
        ("Unknown arguments from config file: ", "unknown key(s) in recipe"),
        ("Some specified arguments are not used by the HfArgumentParser: ", "unknown argument(s)"),
    ):
        if marker in message:
            listed = message.split(marker, 1)[1].split("]", 1)[0].strip("[")
            keys = [item.strip(" '\"") for item in listed.split(",") if item.strip(" '\"").startswith("--")]
            return f"{what}: {', '.join(key[2:] for key in keys)}"
    return " ".join(message.split())


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (*DATA_FILE_FORMATS, ".jinja", ".j2")


def _missing(path: str) -> bool:
    return _looks_local(path) and not Path(path).expanduser().exists()


def source_problems(script_args, training_args, model_args) -> list[str]:
    """Everything a recipe names that must exist or fit together before training: one line per problem.

    A hub id is taken on trust (no network is needed to validate); a local path must exist. The
    arguments may be parsed dataclasses or one raw recipe mapping (``gmt-align validate``).
    """
    from .environment import model_option_problems

    problems = data_source_problems(script_args, training_args)
    prompt, completion = (option_value(script_args, key) for key in ("dataset_prompt_column", "dataset_completion_column"))
    if (prompt is None) != (completion is None):
        problems.append("dataset_prompt_column and dataset_completion_column go together: set both or neither")
    name = option_value(model_args, "model_name_or_path")
    if not name:
        problems.append("model_name_or_path is required")
    elif _missing(name):
        problems.append(f"model_name_or_path: no such directory {name} (quickstart model: make quickstart)")
    template = option_value(training_args, "chat_template_path")  # an SFT field
    if template and _missing(template):
        problems.append(f"chat_template_path: no such file {template}")
    resume = option_value(training_args, "resume_from_checkpoint")  # a path, or true/false (YAML or command line)
    from .runs import BOOLEAN_WORDS

    if isinstance(resume, str) and resume.strip().lower() not in BOOLEAN_WORDS and not Path(resume).expanduser().is_dir():
        problems.append(f"resume_from_checkpoint: no such checkpoint directory {resume}")
    return problems + model_option_problems(model_args)


def load_deepspeed_config(config: dict | str) -> dict:
    """The DeepSpeed config as a dict, from a dict or a JSON file."""
    if isinstance(config, dict):
        return config
    import json

    try:
        loaded = json.loads(Path(config).read_text())
    except FileNotFoundError:
        raise RecipeError(f"deepspeed: no such file {config}") from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"deepspeed: {config} is not valid JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise RecipeError(f"deepspeed: {config} must hold a JSON object")
    return loaded


def deepspeed_refusals(config: dict) -> list[str]:
    """What the backends would refuse at start-up (gmt_align/adapters/zero.py), and what DeepSpeed's
    schema refuses, said before loading."""
    from .adapters.zero import refusals_in_config

    zero = config.get("zero_optimization") or {}
    return (refusals_in_config(config) if isinstance(zero, dict) else []) + zero_schema_problems(config)


def zero_schema_problems(config: dict) -> list[str]:
    """DeepSpeed's own schema for ``zero_optimization`` (unknown keys, bad values such as stage 4),
    one line per problem instead of pydantic's multi-line dump at start-up."""
    from .validate import zero_config

    return zero_config(config)[0]


def model_kwargs(model_args) -> dict:
    """The trainer's ``peft_config`` and ``quantization_config``, built as ``trl sft`` builds them
    (after :func:`~gmt_align.environment.machine_problems` has refused what this machine cannot run)."""
    from trl import get_peft_config, get_quantization_config

    return {"peft_config": get_peft_config(model_args), "quantization_config": get_quantization_config(model_args)}


def ignore_bool_buffers(model) -> list[str]:
    """``ignore_bias_buffers``, as TRL's ``dpo`` script applies it: DDP leaves the model's boolean
    buffers (e.g. causal masks of older architectures) unsynchronised across ranks."""
    import torch

    model._ddp_params_and_buffers_to_ignore = [
        name for name, buffer in model.named_buffers() if buffer.dtype == torch.bool
    ]
    return model._ddp_params_and_buffers_to_ignore


def train(method: str, script_args, training_args, model_args):
    """Load data and model, train with GMT, save model + tokenizer to ``output_dir``."""
    import transformers
    from packaging.version import Version

    from .distributed import ensure_deepspeed_comm
    from .trainers import GMTDPOTrainer, GMTSFTTrainer

    # Before the model: a bad file fails in seconds, with one line naming it (DataError).
    train_dataset, eval_dataset = load_datasets(script_args, training_args, method)
    if training_args.deepspeed:
        ensure_deepspeed_comm(training_args)

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer_class = {"sft": GMTSFTTrainer, "dpo": GMTDPOTrainer}[method]
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        **model_kwargs(model_args),
    )
    if script_args.ignore_bias_buffers:
        ignore_bool_buffers(trainer.model)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"gmt-align: model saved to {os.path.abspath(training_args.output_dir)}")
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return trainer
