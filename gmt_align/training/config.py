"""``GMTSFTConfig``, ``GMTDPOConfig`` and ``GMTGRPOConfig``: TRL's configs plus flat ``gmt_*`` fields;
:func:`gmt_config` adds them to any other (``gmt_config(trl.KTOConfig)``,
``gmt_config(transformers.TrainingArguments)``).

Parameters (added to every field of the parent TRL config):

> GMT selection

    gmt_mask_ratio (`float`, defaults to `0.1`):
        Fraction of the entries of each selection unit that are masked (NOT updated) at each
        optimizer step, chosen on the gradient accumulated over the whole accumulation window.
        ``0 <= gmt_mask_ratio < 1``; ``0`` is exactly the parent trainer, bit for bit. The default
        comes from our miniature study (docs/results.md): no ratio beat vanilla SFT detectably, and
        0.1 was the one closest to it.
    gmt_granularity (`str`, defaults to `"tensor"`):
        ``"tensor"``: one threshold per parameter tensor. ``"global"``: one threshold over all
        maskable parameters together.
    gmt_selection (`str`, defaults to `"magnitude"`):
        ``"magnitude"``: keep the largest |gradient| (GMT). ``"random"``: the same number of
        entries, chosen uniformly at random afresh each step (the ablation baseline).
    gmt_exclude (`list[str]`, defaults to `[]`):
        Regular expressions (``re.search``) over parameter names; a tensor matching any of them
        is never masked (always fully updated). A tied tensor matches through any of its names.
    gmt_seed (`int` or `None`, defaults to `None`):
        Seed of the random masks; ``None`` uses ``seed``.

> GMT update rule

    gmt_mode (`str`, defaults to `"gradient"`):
        ``"gradient"`` (the paper): the optimizer receives the masked gradient. Its state still
        moves masked entries: AdamW's momentum and decoupled weight decay change them.
        ``"update"``: the optimizer receives the masked gradient too, and the masked weights are
        then restored bit for bit, so the step changes no masked weight (weight decay included).
        Their optimizer state is updated as if their gradient were zero (AdamW: ``exp_avg``
        decays by ``beta1``, ``exp_avg_sq`` by ``beta2``, the step count advances).

> GMT faults and resuming

    gmt_nonfinite (`str`, defaults to `"raise"`):
        A step whose gradient holds inf or NaN, in any tensor (masked or excluded), never writes
        into the weights. ``"raise"``: every rank stops with ``NonFiniteGradientError`` (one line).
        ``"skip"``: the step changes no weight and no optimizer state on any rank, and is counted
        in ``gmt/skipped_steps``. fp16 loss-scale overflows are skipped by the scaler either way.
        A gradient exactly zero in every tensor on every rank (a diverged run) follows the same
        rule (``ZeroGradientError``, a subclass), but for online RL (GRPO, RLOO), where it means
        that every group's completions got equal rewards.
    gmt_resume_changed_settings (`bool`, defaults to `False`):
        Allow resuming from a checkpoint trained with other ``gmt_*`` settings (refused otherwise,
        naming the differences); the telemetry (churn, coverage) then starts afresh.
    gmt_resume_reset_optimizer (`bool`, defaults to `False`):
        Allow resuming from a checkpoint whose optimizer state this run cannot load (a DeepSpeed
        checkpoint without ``--deepspeed``, or one saved without optimizer state): the optimizer's
        moments and step count and the learning-rate schedule then start afresh (refused otherwise,
        naming what would be lost).
    overwrite_output_dir (`bool`, defaults to `False`):
        Allow a new run in an ``output_dir`` that holds an earlier run; everything that run wrote
        there (checkpoints, ``gmt_stats.jsonl``, model, tokenizer, model card, logs, figures) is
        removed first. Without it such a run is refused.

> GMT telemetry

    gmt_telemetry (`bool`, defaults to `True`):
        Track retained gradient energy, churn and coverage (``gmt/retained_energy``,
        ``gmt/churn``, ``gmt/coverage``, overall and per block and module kind): 2 bits per entry
        held, one pass over the kept mask and two gradient norms per step. Kept fractions and
        thresholds are logged either way (see :mod:`gmt_align.training.telemetry`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import re
from dataclasses import dataclass, field

from trl import DPOConfig, GRPOConfig, SFTConfig

from gmt_align.core.engine import MaskOptions

__all__ = ["GMTArguments", "GMTSettingError", "GMTDPOConfig", "GMTGRPOConfig", "GMTSFTConfig", "GMT_CHOICES",
           "exclude_problems", "exclude_problems_from_config", "gmt_config", "mask_options",
           "parsing_for_another_machine", "refuse_bf16_without_device"]

GMT_CHOICES = {
    "gmt_granularity": ("tensor", "global"),
    "gmt_mode": ("gradient", "update"),
    "gmt_selection": ("magnitude", "random"),
    "gmt_nonfinite": ("raise", "skip"),
}


class GMTSettingError(ValueError):
    """A ``gmt_*`` setting that does not fit the model (one line), found once the model is built."""


@dataclass
class GMTArguments:
    """The ``gmt_*`` fields, shared by the SFT and DPO configs (see the module docstring)."""

    gmt_mask_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of each unit's entries that are masked (not updated) per optimizer step, "
            "chosen on the accumulated gradient. 0 <= ratio < 1; 0 is plain training."
        },
    )
    gmt_granularity: str = field(
        default="tensor",
        metadata={
            "help": "Selection unit: one threshold per parameter tensor, or one global threshold.",
            "choices": list(GMT_CHOICES["gmt_granularity"]),
        },
    )
    gmt_mode: str = field(
        default="gradient",
        metadata={
            "help": "'gradient': the optimizer gets the masked gradient (momentum and weight decay may "
            "still move masked entries). 'update': masked weights are also left bit-for-bit unchanged.",
            "choices": list(GMT_CHOICES["gmt_mode"]),
        },
    )
    gmt_selection: str = field(
        default="magnitude",
        metadata={
            "help": "'magnitude': keep the largest |gradient| (GMT). 'random': keep as many entries, "
            "drawn uniformly afresh each step (ablation baseline).",
            "choices": list(GMT_CHOICES["gmt_selection"]),
        },
    )
    gmt_exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes over parameter names (re.search); matching tensors are never masked."},
    )
    gmt_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the random masks (gmt_selection=random); defaults to `seed`."},
    )
    gmt_telemetry: bool = field(
        default=True,
        metadata={"help": "Track retained gradient energy, churn and coverage (2 bits per entry, one pass and "
                  "two gradient norms per step); kept fractions and thresholds are logged either way."},
    )

    gmt_nonfinite: str = field(
        default="raise",
        metadata={
            "help": "A step whose gradient holds inf/NaN (any tensor, masked or excluded) or is exactly zero "
            "everywhere: 'raise' stops "
            "every rank with one line; 'skip' leaves weights and optimizer state untouched on every rank "
            "and counts it (gmt/skipped_steps). fp16 loss-scale overflows are skipped either way.",
            "choices": list(GMT_CHOICES["gmt_nonfinite"]),
        },
    )
    gmt_resume_changed_settings: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint trained with other gmt_* settings (refused otherwise); "
                  "GMT's telemetry then starts afresh."},
    )
    gmt_resume_reset_optimizer: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint whose optimizer state this run cannot load (DeepSpeed state "
                  "without --deepspeed, or none saved); the optimizer and learning-rate schedule then start "
                  "afresh (refused otherwise)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds an earlier one: everything that run wrote "
                  "there (checkpoints, gmt_stats.jsonl, model, tokenizer, README.md, logs) is removed first "
                  "(refused otherwise)."},
    )

    def validate_gmt(self) -> None:
        """Raise ``ValueError`` with a one-line message naming the first bad ``gmt_*`` field."""
        ratio = self.gmt_mask_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"gmt_mask_ratio must be a number with 0 <= ratio < 1, got {ratio!r}")
        self.gmt_mask_ratio = float(ratio)
        for key, choices in GMT_CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        if isinstance(self.gmt_exclude, str):
            self.gmt_exclude = [self.gmt_exclude]
        if not isinstance(self.gmt_exclude, (list, tuple)):
            raise ValueError(f"gmt_exclude must be a list of regexes, got {self.gmt_exclude!r}")
        for pattern in self.gmt_exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"gmt_exclude has an invalid regex {pattern!r}: {error}") from None
        if self.gmt_seed is not None and (isinstance(self.gmt_seed, bool) or not isinstance(self.gmt_seed, int)):
            raise ValueError(f"gmt_seed must be an integer or null, got {self.gmt_seed!r}")
        for key in ("gmt_telemetry", "gmt_resume_changed_settings", "gmt_resume_reset_optimizer",
                    "overwrite_output_dir"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")


def exclude_problems(patterns, model) -> list[str]:
    """``gmt_exclude`` patterns that match no parameter name of ``model`` at all, or that leave no
    trainable parameter to mask (GMT would silently be off). A tied parameter is excluded through
    any of its names, as the engine does."""
    names: dict[int, list[str]] = {}
    trainable: dict[int, bool] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        trainable[id(param)] = param.requires_grad
    every_name = [name for group in names.values() for name in group]
    problems = [f"gmt_exclude pattern {pattern!r} matches no parameter of the model"
                for pattern in patterns if not any(re.search(pattern, name) for name in every_name)]
    maskable = [key for key, group in names.items()
                if trainable[key] and not any(re.search(p, name) for p in patterns for name in group)]
    if patterns and any(trainable.values()) and not maskable:
        problems.append(f"gmt_exclude {list(patterns)!r} excludes every trainable parameter: nothing would be "
                        "masked (use gmt_mask_ratio: 0 for plain training)")
    return problems


def exclude_problems_from_config(patterns, model_name_or_path: str, **config_kwargs) -> list[str]:
    """:func:`exclude_problems` before any weight loads: the model is built from its config on the
    meta device (no memory, no weights). ``[]`` when the config cannot be read offline."""
    if not patterns:
        return []
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):  # a hub id without network, or an unknown architecture
        return []
    return exclude_problems(patterns, model)


_OTHER_MACHINE = contextvars.ContextVar("gmt_align_parsing_for_another_machine", default=False)


@contextlib.contextmanager
def parsing_for_another_machine():
    """Within it, configs skip :func:`refuse_bf16_without_device` (``gmt-align validate`` reads recipes
    meant for GPU nodes on a login node, and notes what this machine lacks apart)."""
    token = _OTHER_MACHINE.set(True)
    try:
        yield
    finally:
        _OTHER_MACHINE.reset(token)


def refuse_bf16_without_device(args) -> None:
    """TRL's configs default to bf16; transformers then stops with "Your setup doesn't support
    bf16/gpu" on a machine without one. Say it in gmt-align's words, naming the fix. fp16 where
    it cannot run (the CPU) is refused too: accelerate would silently train in fp32 there."""
    from .machine import bf16_problem, fp16_problem

    if _OTHER_MACHINE.get():
        return
    problem = bf16_problem(args.bf16, args.fp16, args.use_cpu) or fp16_problem(args.fp16, args.use_cpu)
    if problem:
        raise ValueError(problem)


def mask_options(args: GMTArguments) -> MaskOptions:
    """The engine's view of the ``gmt_*`` fields of a config."""
    return MaskOptions(
        mask_ratio=args.gmt_mask_ratio,
        granularity=args.gmt_granularity,
        mode=args.gmt_mode,
        selection=args.gmt_selection,
        exclude=tuple(args.gmt_exclude),
        seed=args.gmt_seed if args.gmt_seed is not None else args.seed,
        nonfinite=args.gmt_nonfinite,
    )


def gmt_config(config_class: type, name: str | None = None) -> type:
    """``config_class`` (a TRL config, or any ``transformers.TrainingArguments`` dataclass) plus the
    ``gmt_*`` fields: a dataclass named ``GMT<Name>`` whose ``__post_init__`` checks them first, then
    refuses bf16 where this machine cannot run it (TRL's configs default to it), then runs the
    parent's. Build it once, at module level, so that a pickled config (``training_args.bin``) finds
    its class again::

        GMTKTOConfig = gmt_config(trl.KTOConfig)
    """
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"gmt_config needs a TrainingArguments dataclass, got {config_class!r}")

    def __post_init__(self):
        self.validate_gmt()
        refuse_bf16_without_device(self)
        super(cls, self).__post_init__()

    name = name or f"GMT{config_class.__name__}"
    cls = dataclass(type(name, (GMTArguments, config_class), {
        "__post_init__": __post_init__,
        "__doc__": f"``{config_class.__module__.partition('.')[0]}.{config_class.__name__}`` plus the ``gmt_*`` "
                   "fields documented in :mod:`gmt_align.training.config`. bf16 where this machine has no bf16 "
                   "device, and fp16 on the CPU, are refused, naming the fix.",
        "__module__": caller_module(),
    }))
    return cls


def caller_module(depth: int = 2) -> str:
    """The ``__name__`` of the module ``depth`` frames up (the one calling a class factory), so that
    pickle finds the class it builds where that module binds it (as namedtuple does)."""
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back if frame is not None else None
    return frame.f_globals.get("__name__", __name__) if frame is not None else __name__


GMTSFTConfig = gmt_config(SFTConfig)
GMTDPOConfig = gmt_config(DPOConfig)
GMTGRPOConfig = gmt_config(GRPOConfig)
