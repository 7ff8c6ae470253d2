"""What this machine has that the training configs need to know: packages, a GPU, bf16.

Lower than the command line (the configs check bf16 in ``__post_init__``; :mod:`gmt_align.cli.environment`
builds ``gmt-align env`` and the recipe's machine problems on these).
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["BF16_FIX", "bf16_problem", "cuda_available", "installed"]

BF16_FIX = "set --bf16 false (bf16: false in the recipe) to train in fp32 here"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, without importing it; None in sys.modules: blocked)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_problem(bf16, fp16, use_cpu) -> str | None:
    """transformers' own rule (TrainingArguments refuses bf16 without a bf16 device unless use_cpu),
    in gmt-align's words. ``bf16`` None is TRL's default: true unless fp16."""
    if not (not fp16 if bf16 is None else bf16) or use_cpu:
        return None
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return None
    default = " (TRL's default when the recipe does not set it)" if bf16 is None else ""
    return f"bf16 is true{default}, but this machine has no GPU with bf16: {BF16_FIX}"
