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

from trl import ModelConfig, ScriptArguments, TrlParser

__all__ = [
    "METHODS",
    "GMTScriptArguments",
    "RecipeError",
    "deepspeed_refusals",
    "load_deepspeed_config",
    "make_parser",
    "parse_recipe",
    "source_problems",
    "train",
]

METHODS = ("sft", "dpo")
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message is one line naming the culprit."""


class _Parser(TrlParser):
    def error(self, message: str):  # argparse prints the whole usage; one line is enough
        raise RecipeError(message)


def _config_class(method: str):
    from .config import GMTDPOConfig, GMTSFTConfig

    return {"sft": GMTSFTConfig, "dpo": GMTDPOConfig}[method]


@dataclass
class GMTScriptArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` plus a mapping for instruction/response datasets.

    Many datasets of the paper's setups (Magicoder-Evol-Instruct, MetaMathQA) hold two text columns
    rather than TRL's formats; naming them turns each row into TRL's conversational
    prompt/completion (one user turn, one assistant turn), so the chat template shapes the prompt
    and the loss covers the completion only.
    """

    dataset_prompt_column: str | None = field(
        default=None,
        metadata={"help": "Text column that becomes the user turn of TRL's conversational prompt/completion "
                  "(with dataset_completion_column); other columns are dropped."},
    )
    dataset_completion_column: str | None = field(
        default=None, metadata={"help": "Text column that becomes the assistant turn (see dataset_prompt_column)."}
    )


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
    for problems in (
        source_problems(script_args, training_args, model_args),
        deepspeed_refusals(load_deepspeed_config(training_args.deepspeed)) if training_args.deepspeed else [],
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
    """Everything a recipe names that must exist before training: one line per problem.

    A hub id is taken on trust (no network is needed to validate); a local path must exist.
    """
    problems = []
    data = script_args.dataset_name
    if not data:
        problems.append("dataset_name is required (a hub dataset or a local .json/.jsonl/.parquet file)")
    elif _missing(data):
        problems.append(f"dataset_name: no such file {data} (quickstart data: make quickstart)")
    if (script_args.dataset_prompt_column is None) != (script_args.dataset_completion_column is None):
        problems.append("dataset_prompt_column and dataset_completion_column go together: set both or neither")
    name = model_args.model_name_or_path
    if not name:
        problems.append("model_name_or_path is required")
    elif _missing(name):
        problems.append(f"model_name_or_path: no such directory {name} (quickstart model: make quickstart)")
    template = getattr(training_args, "chat_template_path", None)  # an SFT field
    if template and _missing(template):
        problems.append(f"chat_template_path: no such file {template}")
    return problems


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
    """What the backends would refuse at start-up (gmt_align/adapters/zero.py), said before loading."""
    from .adapters.zero import refusals_in_config

    return refusals_in_config(config)


def load_train_dataset(script_args):
    """A hub dataset by name, or a local JSON/JSONL/parquet file, as TRL's trainers take it."""
    from datasets import load_dataset

    source = script_args.dataset_name
    builder = DATA_FILE_FORMATS.get(Path(source).suffix)
    if builder is not None:
        dataset = load_dataset(builder, data_files=str(Path(source).expanduser()), split="train")
    else:
        dataset = load_dataset(source, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
        dataset = dataset[script_args.dataset_train_split]
    if script_args.dataset_prompt_column is None:
        return dataset
    prompt, completion = script_args.dataset_prompt_column, script_args.dataset_completion_column
    return dataset.map(
        lambda row: {
            "prompt": [{"role": "user", "content": row[prompt]}],
            "completion": [{"role": "assistant", "content": row[completion]}],
        },
        remove_columns=list(dataset.column_names or [prompt, completion]),
    )


def train(method: str, script_args, training_args, model_args):
    """Load data and model, train with GMT, save model + tokenizer to ``output_dir``."""
    import transformers
    from packaging.version import Version
    from trl import get_peft_config

    from .distributed import ensure_deepspeed_comm
    from .trainers import GMTDPOTrainer, GMTSFTTrainer

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
        train_dataset=load_train_dataset(script_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"gmt-align: model saved to {os.path.abspath(training_args.output_dir)}")
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return trainer
