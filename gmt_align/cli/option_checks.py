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
- a package the option needs and this machine lacks (:func:`package_problems`, listed with
  :func:`gmt_align.cli.environment.machine_problems`): ``report_to`` integrations (tensorboard, mlflow,
  ...), optimizers of other packages (``adamw_bnb_8bit`` and the other bitsandbytes ones, GaLore, APOLLO,
  LOMO, schedule-free, torchao), ``attn_implementation`` flash_attention_2/3 or a hub kernel, and a GPU
  for ``activation_offloading`` (TRL's offloading otherwise fails on ``current_accelerator()`` being None).
- ``padding_free`` without ``packing`` while ``max_length`` is set (SFTTrainer refuses it), and
  ``lora_target_modules`` that name no module of the model (peft refuses them when it wraps the model;
  checked on the model built from its config on the meta device, no weights).
- a renamed key (``torch_dtype``, now ``dtype``): :data:`RENAMED` gives the hint for the unknown key.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import option_value

__all__ = ["RENAMED", "hub_problems", "lora_target_problems", "one_process_problems", "package_problems",
           "sft_option_problems", "template_problems"]

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


# report_to value -> (transformers' availability check, what to pip install)
_INTEGRATIONS = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"), "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow"), "comet_ml": ("is_comet_available", "comet_ml"),
    "clearml": ("is_clearml_available", "clearml"), "trackio": ("is_trackio_available", "trackio"),
    "neptune": ("is_neptune_available", "neptune"), "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "dvclive": ("is_dvclive_available", "dvclive"), "swanlab": ("is_swanlab_available", "swanlab"),
    "dagshub": ("is_dagshub_available", "dagshub mlflow"), "azure_ml": ("is_azureml_available", "azureml-core"),
    "flyte": ("is_flytekit_available", "flytekit"),
}
# Optimizers of transformers' ``optim`` that another package implements: (part of the name, module, pip name).
_OPTIMIZER_PACKAGES = (
    ("torch_4bit", "torchao", "torchao"), ("torch_8bit", "torchao", "torchao"),
    ("bnb", "bitsandbytes", "bitsandbytes"), ("8bit", "bitsandbytes", "bitsandbytes"),
    ("paged_", "bitsandbytes", "bitsandbytes"), ("lion", "bitsandbytes", "bitsandbytes"),
    ("ademamix", "bitsandbytes", "bitsandbytes"), ("galore", "galore_torch", "galore-torch"),
    ("apollo", "apollo_torch", "apollo-torch"), ("lomo", "lomo_optim", "lomo-optim"),
    ("grokadamw", "grokadamw", "grokadamw"), ("schedule_free", "schedulefree", "schedulefree"),
    ("stable_adamw", "optimi", "torch-optimi"), ("anyprecision", "torchdistx", "torchdistx"),
)


def package_problems(training_args, model_args) -> list[str]:
    """A package (or GPU kernel) that ``report_to``, ``optim`` or ``attn_implementation`` needs and this
    machine lacks; each would stop the run only once the model has loaded."""
    from transformers.integrations import integration_utils

    from gmt_align.training.machine import installed

    problems = []
    report_to = option_value(training_args, "report_to") or []
    for name in [report_to] if isinstance(report_to, str) else list(report_to):
        check, package = _INTEGRATIONS.get(name, (None, None))
        if check and not getattr(integration_utils, check)():
            problems.append(f"report_to {name} needs the {package} package, which is not installed: pip install "
                            f"{package}, or drop {name} from report_to")
    optim = option_value(training_args, "optim") or ""
    optim = str(getattr(optim, "value", optim))  # parsed: transformers' OptimizerNames
    needed = next(((module, package) for part, module, package in _OPTIMIZER_PACKAGES if part in optim), None)
    if needed and not installed(needed[0]):
        problems.append(f"optim {optim} needs the {needed[1]} package, which is not installed: pip install "
                        f"{needed[1]}, or choose another optim (adamw_torch)")
    if option_value(training_args, "activation_offloading"):
        import torch

        if getattr(torch, "accelerator", None) is not None and torch.accelerator.current_accelerator() is None:
            problems.append("activation_offloading moves activations from the GPU to the CPU, and this machine has "
                            "no GPU: drop activation_offloading")
    attention = option_value(model_args, "attn_implementation")
    if attention:
        from transformers.utils import import_utils

        check = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available"}
        if attention in check and not getattr(import_utils, check[attention])():
            problems.append(f"attn_implementation {attention} needs the flash-attn package and a CUDA GPU, and this "
                            "machine lacks them: use sdpa (the default) or eager")
        elif "/" in attention and not import_utils.is_kernels_available():
            problems.append(f"attn_implementation {attention} is a hub kernel, which needs the kernels package: "
                            "pip install kernels, or use sdpa (the default)")
    return problems


def sft_option_problems(training_args) -> list[str]:
    """SFT settings SFTTrainer refuses once the model has loaded."""
    if option_value(training_args, "padding_free") and not option_value(training_args, "packing") \
            and option_value(training_args, "max_length", 1024) is not None:
        return ["padding_free without packing does not enforce max_length, which TRL refuses: set packing true, "
                "or max_length null (inputs already truncated)"]
    return []


def lora_target_problems(training_args, model_args) -> list[str]:
    """``lora_target_modules`` of which no module of the model is a match (see the module docstring); ``[]``
    when the model's config cannot be read offline, or peft is missing (a machine problem of its own)."""
    targets = option_value(model_args, "lora_target_modules")
    if not option_value(model_args, "use_peft") or not targets:
        return []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if "all-linear" in targets:
        return []
    from gmt_align.training.machine import installed

    if not installed("peft"):
        return []
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(option_value(model_args, "model_name_or_path"),
                                            revision=option_value(model_args, "model_revision"),
                                            trust_remote_code=bool(option_value(training_args, "trust_remote_code")))
        with init_empty_weights():
            modules = dict(AutoModelForCausalLM.from_config(config).named_modules())
    except (OSError, ValueError):  # a hub id without network, or an unknown architecture
        return []
    import torch

    missing = [t for t in targets if not any(check_target_module_exists(LoraConfig(target_modules=[t]), n) for n in modules)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, torch.nn.Linear)})
        return [f"lora_target_modules {' '.join(missing)}: no module of the model is named so (its linear layers: "
                f"{', '.join(linear)})"]
    return []
