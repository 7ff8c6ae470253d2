"""gmt-align: Gradient-Mask Tuning for TRL's SFT and DPO trainers.

Names are imported on first use, so ``import gmt_align.quickstart`` or ``gmt-align --help`` does
not pay for importing trl and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GMTArguments": "config",
    "GMTDPOConfig": "config",
    "GMTSFTConfig": "config",
    "GMTDPOTrainer": "trainers",
    "GMTSFTTrainer": "trainers",
    "MaskEngine": "engine",
    "MaskOptions": "engine",
    "NonFiniteGradientError": "selection",
    "keep_count": "selection",
    "select_thresholds": "selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'gmt_align' has no attribute {name!r}")
