"""A DeepSpeed JSON config, checked alone and next to a recipe's training arguments, before any model loads.

Called by :func:`gmt_align.cli.recipe.problems` (``gmt-align sft|dpo``, first problem) and by
``gmt-align validate`` (every problem). What counts as a problem:

- what GMT refuses (:data:`gmt_align.backends.zero.REFUSALS`), and DeepSpeed's own schema for
  ``zero_optimization`` (unknown keys, bad values such as stage 4);
- explicit values that contradict the recipe, found by transformers' own matching
  (``HfTrainerDeepSpeedConfig``: batch size, accumulation, clipping, optimizer, fp16/bf16);
- combinations that would stop or silently change a run: fp16 with bf16; ZeRO-3 without
  ``stage3_gather_16bit_weights_on_model_save`` (``gmt-align`` ends by saving a plain HF model, which
  ZeRO-3 then cannot write); optimizer offload with the Trainer's own optimizer and
  ``zero_force_ds_cpu_optimizer`` left true; ``offload_param`` below ZeRO-3; fp16/bf16 without ZeRO
  (DeepSpeed's FP16 optimizers, which GMT cannot see into); a JSON ``optimizer``/``scheduler`` block
  next to a recipe's ``optim``/``lr_scheduler_type``, which it would silently override.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Collection
from pathlib import Path

from gmt_align.core.contract import Contract

from .common import RecipeError

# _contradictions subclasses transformers' matcher and overrides fill_match, reading the node it
# fills (find_config_node) and the list it appends to (mismatches, set in __init__).
CONTRACT = Contract(checked_with="transformers 5.2", names=(
    "transformers.integrations.deepspeed:HfTrainerDeepSpeedConfig.fill_match",
    "transformers.integrations.deepspeed:HfTrainerDeepSpeedConfig.find_config_node",
    "transformers.integrations.deepspeed:set_hf_deepspeed_config",
))

__all__ = ["CONTRACT", "deepspeed_problems", "deepspeed_refusals", "load_deepspeed_config", "zero_config"]


def load_deepspeed_config(config: dict | str) -> dict:
    """The DeepSpeed config as a dict, from a dict or a JSON file (``RecipeError``, one line, if neither)."""
    if isinstance(config, dict):
        return config
    try:
        loaded = json.loads(Path(config).read_text())
    except FileNotFoundError:
        raise RecipeError(f"deepspeed: no such file {config}") from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"deepspeed: {config} line {error.lineno} column {error.colno}: not valid JSON "
                          f"({error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, unreadable, not text
        reason = error.strerror if isinstance(error, OSError) else error
        raise RecipeError(f"deepspeed: {config} cannot be read ({reason})") from None
    if not isinstance(loaded, dict):
        raise RecipeError(f"deepspeed: {config} must hold a JSON object")
    return loaded


def deepspeed_refusals(config: dict) -> list[str]:
    """What the backends would refuse at start-up (gmt_align/adapters/zero.py), and what DeepSpeed's
    schema refuses."""
    from gmt_align.backends.zero import refusals_in_config

    zero = config.get("zero_optimization") or {}
    return (refusals_in_config(config) if isinstance(zero, dict) else []) + zero_config(config)[0]


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


def _contradictions(config: dict, args) -> tuple[list[tuple], object]:
    """transformers' matching of the config against the training arguments, as (ds key, ds value,
    hf key, hf value), and the resolved config (its ``is_true`` answers fp16/bf16)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, set_hf_deepspeed_config

    class Matched(HfTrainerDeepSpeedConfig):
        def __init__(self, config):
            super().__init__(config)
            self.contradictions = []

        def fill_match(self, ds_key_long, hf_val, hf_key=None, must_match=True):
            node, ds_key = self.find_config_node(ds_key_long)
            ds_val, before = (None if node is None else node.get(ds_key)), len(self.mismatches)
            super().fill_match(ds_key_long, hf_val, hf_key, must_match)
            if len(self.mismatches) > before:
                self.contradictions.append((ds_key_long, ds_val, hf_key, hf_val))

    resolved = Matched(copy.deepcopy(config))
    # Building one makes it transformers' global DeepSpeed config (it decides zero.Init at model
    # load): hand that back to the run's own, if these arguments have one.
    if getattr(args, "hf_deepspeed_config", None) is not None:
        set_hf_deepspeed_config(args.hf_deepspeed_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved.trainer_config_process(args)
    return resolved.contradictions, resolved


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


def deepspeed_problems(config: dict, args, explicit: Collection[str]) -> list[str]:
    """Problems of a DeepSpeed config, alone and next to the recipe's parsed training arguments
    (``args``; None where the recipe could not be parsed). ``explicit``: the keys the recipe sets."""
    problems = deepspeed_refusals(config)
    if not isinstance(config.get("zero_optimization") or {}, dict):
        return problems
    _, zero = zero_config(config)
    stage = int(zero.stage) if zero is not None else None  # None: invalid, reported above

    if args is not None:
        contradictions, resolved = _contradictions(config, args)
        for ds_key, ds_value, hf_key, hf_value in contradictions:
            if ds_key != "train_batch_size":  # depends on the number of processes: below
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
    for block, key in (("optimizer", "optim"), ("scheduler", "lr_scheduler_type")):
        if config.get(block) and key in explicit:
            value = getattr(getattr(args, key, None), "value", getattr(args, key, None))  # an enum's name
            problems.append(f"the JSON's {block} block replaces the recipe's {key}"
                            f"{f': {value}' if value else ''} (remove one of them)")
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
