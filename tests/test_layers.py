"""The package's layers, read from its source: each layer imports only the layers before it, no two
modules import each other (function-level imports included), benchmarks never import tests/, and
every internal of another library that a module reads is listed in that module's CONTRACT."""

import ast
import importlib
from pathlib import Path

import pytest

from gmt_align.cli.contracts import READERS, contracts

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gmt_align"
LAYERS = ("core", "backends", "training", "evaluation", "cli", "quickstart")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every gmt_align module that ``name`` imports, at module level or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        # the longest prefix of each target that is one of our modules ("from . import x" names a module)
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    loose = [name for name in MODULES if layer_of(name) is None and name not in ("gmt_align", "gmt_align.testing")]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})"
              for name in MODULES if layer_of(name) is not None
              for target in sorted(imports_of(name))
              if layer_of(target) is not None and layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {name: imports_of(name) - {"gmt_align"} for name in MODULES}
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_package_never_imports_its_testing_helpers():
    users = [name for name in MODULES if "gmt_align.testing" in imports_of(name)]
    assert not users


def test_benchmarks_import_the_package_never_tests():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        assert '"tests"' not in text and "multirank" not in text, f"{path.name} reaches into tests/"


def test_the_layer_check_sees_function_level_and_relative_imports():
    assert "gmt_align.core.build_lock" in imports_of("gmt_align.core.kernels")
    assert "gmt_align.evaluation.likelihood" in imports_of("gmt_align.cli.evaluate")  # inside main()
    assert "gmt_align.backends.layout" in imports_of("gmt_align.backends.zero12")  # relative


# ------------------------------------------------------------------------------------ contracts


def test_every_contract_holds_on_this_installation():
    assert {name: contract.missing_names() for name, contract in contracts().items()} == dict.fromkeys(READERS, [])


def test_a_missing_name_is_reported():
    from gmt_align.core.contract import Contract

    broken = Contract(checked_with="torch 2.13", names=("torch:_no_such_name", "no_such_module:x", "torch:Tensor"))
    assert broken.missing_names() == ["torch:_no_such_name", "no_such_module:x"]


def _ours() -> set[str]:
    """Private names that gmt_align defines itself: its functions, classes, module and class
    variables, and the attributes its methods set on ``self`` (an attribute set on another library's
    object is not ours: it is read there, and must be listed like a read)."""
    names = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def private_reads() -> dict[str, set[str]]:
    """Module -> the private names of other libraries it reads: ``obj._name`` for a name gmt_align
    does not define, and ``from library import _name``."""
    ours, reads = _ours(), {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):  # read or set
                attr = node.attr
                if attr.startswith("_") and not attr.startswith("__") and attr not in ours:
                    reads.setdefault(name, set()).add(attr)
            elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("gmt_align"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        reads.setdefault(name, set()).add(alias.name)
                if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                    reads.setdefault(name, set()).add(node.module)
    return reads


def listed(contract) -> set[str]:
    names = set(contract.optimizer) | set(contract.parameter) | set(contract.mapping) | set(contract.conditional)
    for entry in contract.names:
        module, _, path = entry.partition(":")
        names |= {module, *path.split(".")}
        names |= set(module.split("."))
    return names


def test_every_private_name_read_is_in_the_reading_modules_contract():
    unlisted = []
    for name, read in sorted(private_reads().items()):
        contract = getattr(importlib.import_module(name), "CONTRACT", None)
        if name not in READERS or contract is None:
            unlisted.append(f"{name} reads {sorted(read)} but is not a contract reader (gmt_align/cli/contracts.py)")
            continue
        missing = sorted(read - listed(contract))
        if missing:
            unlisted.append(f"{name} reads {missing}, which its CONTRACT does not list")
    assert not unlisted, "\n".join(unlisted)


@pytest.mark.parametrize("source, expected", [
    ("import torch\nx = torch._foreach_norm\n", {"_foreach_norm"}),
    ("from torch.utils.cpp_extension import _get_build_directory\n", {"_get_build_directory"}),
    ("import deepspeed\ndef f(o):\n    return o.optimizer._hp_mapping\n", {"_hp_mapping"}),
    ("def f(model):\n    model._ddp_params_and_buffers_to_ignore = []\n", {"_ddp_params_and_buffers_to_ignore"}),
    ("class A:\n    def __init__(self):\n        self._mine = 1\n    def f(self):\n        return self._mine\n", set()),
])
def test_the_private_read_check_finds_them(tmp_path, monkeypatch, source, expected):
    path = tmp_path / "gmt_align" / "probe.py"
    path.parent.mkdir()
    path.write_text(source)
    monkeypatch.setitem(globals(), "MODULES", {"gmt_align.probe": path})
    assert private_reads().get("gmt_align.probe", set()) == expected


def test_every_folder_of_the_package_is_a_package():
    """setuptools' find (pyproject.toml) packs only folders with an __init__.py: a layer without one
    would be missing from the wheel, though an editable install still imports it."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert [str(f.relative_to(ROOT)) for f in sorted(folders) if not (f / "__init__.py").is_file()] == []
