"""TRL options that TRL or transformers would refuse only after the model has loaded (a traceback, minutes
in), refused here in one line before anything loads; and the keys TRL or transformers renamed.

- ``assistant_only_loss`` with a chat template that has no ``{% generation %}`` markers and that TRL
  cannot patch (``trl.chat_template_utils.get_training_chat_template`` raises inside ``SFTTrainer``): the
  tokenizer alone is loaded to read its template (or ``chat_template_path``'s).
- ``fsdp`` (transformers' own FSDP option) in one process: the Trainer raises "Using fsdp only works in
  distributed training".
- ``push_to_hub`` where the Hub cannot be reached (``HF_HUB_OFFLINE``) or without a token: the run would
  die creating the repository (``OfflineModeIsEnabled``); a note in ``gmt-align validate``, since a recipe
  is often checked elsewhere (:func:`gmt_align.cli.environment.machine_problems` lists it).
- a renamed key (``torch_dtype``, now ``dtype``): :data:`RENAMED` gives the hint for the unknown key.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import option_value

__all__ = ["RENAMED", "hub_problems", "one_process_problems", "template_problems"]

# Keys of older TRL / transformers releases -> today's field (tests/test_option_checks.py checks both ends).
RENAMED = {
    "torch_dtype": "dtype",
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "push_to_hub_token": "hub_token",
}


def template_problems(training_args, model_args) -> list[str]:
    """``assistant_only_loss`` with a chat template SFTTrainer cannot train with (see the module docstring);
    ``[]`` when the tokenizer cannot be read offline (a hub id not in the cache)."""
    if not option_value(training_args, "assistant_only_loss"):
        return []
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    name = option_value(model_args, "model_name_or_path")
    template_path = option_value(training_args, "chat_template_path")
    tokenizer = _tokenizer(name, model_args, training_args)
    if tokenizer is None:
        return []
    if template_path and Path(template_path).suffix in (".jinja", ".j2") and Path(template_path).is_file():
        tokenizer.chat_template, where = Path(template_path).read_text(), template_path
    elif template_path:  # TRL clones the template of another tokenizer
        source = _tokenizer(template_path, model_args, training_args)
        if source is None:
            return []
        tokenizer.chat_template, where = source.chat_template, f"the tokenizer of {template_path}"
    else:
        where = f"the chat template of {name}"
    if not tokenizer.chat_template:
        return [f"assistant_only_loss needs a chat template, and {where} has none: set chat_template_path "
                "(a .jinja file with {% generation %} markers), or drop assistant_only_loss"]
    if has_generation_markers(tokenizer.chat_template):
        return []
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return [f"assistant_only_loss needs {{% generation %}} markers in the chat template, and {where} has none "
                "(nor is it one TRL can patch): set chat_template_path to a .jinja template with them, or drop "
                "assistant_only_loss"]
    return []


def _tokenizer(name, model_args, training_args):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=option_value(model_args, "model_revision"),
                                             trust_remote_code=bool(option_value(training_args, "trust_remote_code")))
    except (OSError, ValueError, TypeError):  # a hub id without network, or no tokenizer there
        return None


def one_process_problems(training_args) -> list[str]:
    """What only a run of several processes can do, asked of a run of one (not under a launcher)."""
    if option_value(training_args, "fsdp") and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ["fsdp shards the model across processes, and this is one process: launch several "
                "(--accelerate_config fsdp2 --num_processes N), or drop fsdp"]
    return []


def hub_problems(training_args) -> list[str]:
    """``push_to_hub`` where the run could not create its repository (see the module docstring)."""
    if not option_value(training_args, "push_to_hub"):
        return []
    from huggingface_hub import get_token, is_offline_mode

    if is_offline_mode():
        return ["push_to_hub needs the Hugging Face Hub, and HF_HUB_OFFLINE is set: drop push_to_hub (push the "
                "saved output_dir later), or unset HF_HUB_OFFLINE"]
    if not (option_value(training_args, "hub_token") or get_token()):
        return ["push_to_hub needs a Hub token, and none is set: hf auth login, HF_TOKEN, or hub_token; or drop "
                "push_to_hub"]
    return []
