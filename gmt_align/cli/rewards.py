"""The rewards of ``gmt-align grpo``, named in a recipe as ``trl grpo`` names them.

```yaml
reward_funcs: [arithmetic_accuracy]          # gmt-align's (gmt_align.evaluation.rewards)
reward_funcs: [think_format_reward]          # TRL's own, by the names trl grpo knows
reward_funcs: [my_lib.rewards.exact]         # any function: a dotted path, as trl grpo takes it,
reward_funcs: ["my_lib/rewards.py:exact"]    # or module:function (a module name or a .py file)
reward_model_name_or_path: path/or/hub-id    # a sequence-classification model, scored by TRL
```

A module is looked up from the working directory first, as ``trl grpo`` does. Every name is resolved
(its module imported) before the model loads: :func:`reward_problems` says in one line what cannot be.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .common import option_value

__all__ = ["TRL_REWARDS", "RewardError", "missing_packages", "resolve_reward", "reward_functions", "reward_problems"]

# trl grpo's registry (trl/scripts/grpo.py), with the package each needs beyond TRL.
TRL_REWARDS = {"accuracy_reward": "math_verify", "reasoning_accuracy_reward": "math_verify",
               "think_format_reward": None, "get_soft_overlong_punishment": None}


class RewardError(ValueError):
    """A reward name that resolves to no function (one line)."""


def resolve_reward(name: str) -> Callable:
    """The function a recipe's reward name means (see the module docstring); :class:`RewardError` if none."""
    from gmt_align.evaluation.rewards import REWARDS

    if not isinstance(name, str) or not name:
        raise RewardError(f"reward_funcs: a name must be a non-empty string, got {name!r}")
    if name in REWARDS:
        return REWARDS[name]
    if name in TRL_REWARDS:
        return _trl_reward(name)
    if ":" in name:
        module_name, _, function = name.rpartition(":")
    elif "." in name:
        module_name, _, function = name.rpartition(".")
    else:
        known = ", ".join([*REWARDS, *TRL_REWARDS])
        raise RewardError(f"reward_funcs: unknown reward {name!r}: one of {known}, a dotted path "
                          "(my_lib.rewards.exact) or module:function")
    module = _import(module_name, name)
    found = getattr(module, function, None)
    if not callable(found):
        raise RewardError(f"reward_funcs: {name!r}: {module_name} has no function {function!r}")
    return found


def _trl_reward(name: str) -> Callable:
    """TRL's function (what it needs installed is a machine problem: :func:`missing_packages`)."""
    from trl import rewards

    if name == "get_soft_overlong_punishment":  # as trl grpo builds it
        return rewards.get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256)
    return getattr(rewards, name)


def _import(module_name: str, name: str):
    """``module_name`` from the working directory first (``trl grpo`` puts it first on ``sys.path``), or a
    ``.py`` file. Either is run once per process, as an import is: the checks before loading, the data
    check and the trainer all resolve the same names."""
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise RewardError(f"reward_funcs: {name!r}: no such file {module_name}")
        key = f"gmt_align_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - the user's module: say what it raised, in one line
            raise RewardError(f"reward_funcs: {name!r}: importing {module_name} failed: "
                              f"{type(error).__name__}: {error}") from None
        sys.modules[key] = module
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise RewardError(f"reward_funcs: {name!r}: no module named {error.name!r}") from None
    except Exception as error:  # noqa: BLE001
        raise RewardError(f"reward_funcs: {name!r}: importing {module_name} failed: "
                          f"{type(error).__name__}: {error}") from None


def missing_packages(script_args) -> list[str]:
    """One line per TRL reward named whose package this machine lacks (a note in ``validate``: the
    GPU nodes may have it)."""
    from gmt_align.training.machine import installed

    names = option_value(script_args, "reward_funcs") or []
    return [f"reward_funcs: TRL's {name} needs the math-verify package, which is not installed: pip install math-verify"
            for name in ([names] if isinstance(names, str) else names)
            if TRL_REWARDS.get(name) == "math_verify" and not installed("math_verify")]


def reward_functions(script_args) -> list:
    """The ``reward_funcs`` argument of TRL's ``GRPOTrainer``: the reward model first, then the functions,
    in the recipe's order (as ``trl grpo`` builds it)."""
    found = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    return found + [resolve_reward(name) for name in script_args.reward_funcs or []]


def reward_problems(script_args, needs_one: bool = False) -> list[str]:
    """One line per reward name that resolves to nothing, and (``needs_one``: a GRPO recipe) a recipe
    that names no reward at all. ``script_args`` may be parsed arguments or a raw recipe mapping."""
    names = option_value(script_args, "reward_funcs")
    model = option_value(script_args, "reward_model_name_or_path")
    if isinstance(names, str):
        names = [names]
    problems = []
    if needs_one and not names and not model:
        problems.append("GRPO needs a reward: reward_funcs (e.g. [arithmetic_accuracy], a TRL reward or "
                        "module:function) or reward_model_name_or_path")
    for name in names or []:
        try:
            resolve_reward(name)
        except RewardError as error:
            problems.append(str(error))
    return problems
