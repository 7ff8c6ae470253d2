"""gmt-align: Gradient-Mask Tuning for TRL's trainers (SFT, DPO and GRPO commands; any Trainer through
``with_gmt``).

The package is layered, each layer importing only those before it:

- ``gmt_align.core``: the selection, its kernels, the masking engine, the all-reduce (torch only);
- ``gmt_align.backends``: one module per optimizer kind, mapping what each rank holds;
- ``gmt_align.training``: TRL's configs and trainers with GMT, telemetry, run folders;
- ``gmt_align.evaluation``: held-out problems and metrics;
- ``gmt_align.cli``: the ``gmt-align`` commands, recipes and their checks;
- ``gmt_align.quickstart``: the quickstart's model and data.

Names are imported on first use, so ``import gmt_align.quickstart`` or ``gmt-align --help`` does
not pay for importing trl and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GMTArguments": "training.config",
    "GMTDPOConfig": "training.config",
    "GMTGRPOConfig": "training.config",
    "GMTSFTConfig": "training.config",
    "GMTDPOTrainer": "training.trainers",
    "GMTGRPOTrainer": "training.trainers",
    "GMTSFTTrainer": "training.trainers",
    "GMTTrainerMixin": "training.trainers",
    "with_gmt": "training.trainers",
    "gmt_config": "training.config",
    "attach": "backends",
    "MaskHooks": "backends",
    "MaskEngine": "core.engine",
    "MaskOptions": "core.engine",
    "NonFiniteGradientError": "core.selection",
    "keep_count": "core.selection",
    "select_thresholds": "core.selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'gmt_align' has no attribute {name!r}")
