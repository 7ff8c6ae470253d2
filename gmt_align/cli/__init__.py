"""The ``gmt-align`` command line: commands, recipes, their checks, and the run they start."""

from .main import main

__all__ = ["main"]
