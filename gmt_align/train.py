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
from pathlib import Path

from trl import ModelConfig, ScriptArguments, TrlParser

__all__ = ["METHODS", "RecipeError", "make_parser", "parse_recipe", "train"]

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


def make_parser(method: str) -> TrlParser:
    return _Parser((ScriptArguments, _config_class(method), ModelConfig), prog=f"gmt-align {method}")


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
    _check_sources(script_args, model_args)
    _check_deepspeed(training_args.deepspeed)
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
    return path.startswith((".", "/", "~")) or Path(path).suffix in DATA_FILE_FORMATS


def _check_sources(script_args, model_args) -> None:
    if not script_args.dataset_name:
        raise RecipeError("dataset_name is required (a hub dataset or a local .json/.jsonl/.parquet file)")
    if _looks_local(script_args.dataset_name) and not Path(script_args.dataset_name).expanduser().exists():
        raise RecipeError(f"dataset_name: no such file {script_args.dataset_name} (quickstart data: make quickstart)")
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError("model_name_or_path is required")
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise RecipeError(f"model_name_or_path: no such directory {name} (quickstart model: make quickstart)")


def _check_deepspeed(config) -> None:
    """Say before loading what the adapters would refuse at start-up (gmt_align/adapters/zero.py)."""
    if not config:
        return
    from .adapters.zero import REFUSALS

    if isinstance(config, str):
        import json

        try:
            config = json.loads(Path(config).read_text())
        except FileNotFoundError:
            raise RecipeError(f"deepspeed: no such file {config}") from None
        except json.JSONDecodeError as error:
            raise RecipeError(f"deepspeed: {config} is not valid JSON ({error})") from None
    zero = config.get("zero_optimization") or {}
    for key in ("round_robin_gradients", "zenflow"):
        if zero.get(key):
            raise RecipeError(REFUSALS[key])
    if (zero.get("offload_optimizer") or {}).get("device") == "nvme":
        raise RecipeError(REFUSALS["nvme"])


def load_train_dataset(script_args):
    """A hub dataset by name, or a local JSON/JSONL/parquet file, as TRL's trainers take it."""
    from datasets import load_dataset

    source = script_args.dataset_name
    builder = DATA_FILE_FORMATS.get(Path(source).suffix)
    if builder is not None:
        return load_dataset(builder, data_files=str(Path(source).expanduser()), split="train")
    dataset = load_dataset(source, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    return dataset[script_args.dataset_train_split]


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
