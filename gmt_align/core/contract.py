"""Contracts: the internals of other libraries that gmt_align reads, listed where they are read.

Whatever no release of torch, DeepSpeed or transformers promises to keep (a private name, an
attribute set inside a class's ``__init__``, a method overridden in a subclass) is read by one module
only, and that module lists it in its ``CONTRACT``. Names of a module or class (``names``) are
checked at start-up, before any model loads (:func:`gmt_align.cli.contracts.missing_internals`);
attributes that exist only on live objects (a DeepSpeed optimizer, its parameters) are checked on the
real instances when a backend attaches (:meth:`Contract.check`). Either way a release that renames
one fails in one line at start-up instead of masking wrongly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Contract", "UnsupportedOptimizerError"]


class UnsupportedOptimizerError(RuntimeError):
    """GMT cannot place its mask inside this optimizer; training must not go on unmasked."""


@dataclass(frozen=True)
class Contract:
    """The internals one module reads, by where they live.

    Attributes:
        checked_with: the library release these were read from, e.g. ``"deepspeed 0.19.8"``.
        names: ``"package.module:Class.attribute"`` (or ``"package.module:function"``), each a name
            that must resolve by import and attribute lookup; checked at start-up.
        optimizer: on the optimizer a backend maps (DeepSpeed's), on every instance.
        parameter: on each model parameter the backend maps.
        mapping: on each parameter's ``_hp_mapping`` that is not None.
        conditional: on the optimizer only in some configurations: name -> a predicate of the
            optimizer (built from attributes in ``optimizer``) that says when it must exist.
    """

    checked_with: str
    names: tuple[str, ...] = ()
    optimizer: tuple[str, ...] = ()
    parameter: tuple[str, ...] = ()
    mapping: tuple[str, ...] = ()
    conditional: dict[str, Callable[[object], bool]] = field(default_factory=dict)

    def missing_names(self) -> list[str]:
        """The entries of ``names`` that do not resolve here (a module that is not installed counts:
        only modules of installed dependencies are named)."""
        absent = []
        for name in self.names:
            module_name, _, path = name.partition(":")
            try:
                obj = importlib.import_module(module_name)
                for part in filter(None, path.split(".")):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError):
                absent.append(name)
        return absent

    def missing(self, optimizer: object, parameters: Iterable[object] = ()) -> list[str]:
        """The attributes of this contract that ``optimizer`` and ``parameters`` lack (or, for a
        conditional one, that exist though the condition says they should not, or the reverse)."""
        absent = [name for name in self.optimizer if not hasattr(optimizer, name)]
        if absent:
            return absent
        for name, expected in self.conditional.items():
            if hasattr(optimizer, name) != bool(expected(optimizer)):
                absent.append(f"{name} (expected {'present' if expected(optimizer) else 'absent'})")
        for param in parameters:
            absent += [f"parameter.{name}" for name in self.parameter if not hasattr(param, name)]
            mapping = getattr(param, "_hp_mapping", None) if self.mapping else None
            if mapping is not None:
                absent += [f"_hp_mapping.{name}" for name in self.mapping if not hasattr(mapping, name)]
        return list(dict.fromkeys(absent))

    def check(self, optimizer: object, parameters: Sequence[object] = ()) -> None:
        """Refuse, in one line, an optimizer whose internals are not the ones its backend reads."""
        absent = self.missing(optimizer, parameters)
        if absent:
            raise UnsupportedOptimizerError(
                f"GMT cannot map {type(optimizer).__name__}: it lacks {', '.join(absent)} "
                f"(GMT reads them as in {self.checked_with}; this release differs)"
            )
