"""``--accelerate_config NAME|PATH`` and ``--num_processes N`` on every training command, as ``trl sft`` takes them.

```bash
gmt-align sft --config recipes/quickstart/sft.yaml --accelerate_config zero2 --num_processes 2
```

Either option makes the command start itself again under ``accelerate launch`` (accelerate's own
launcher, as TRL's CLI does): ``accelerate launch --config_file CONFIG --num_processes N -m gmt_align.cli
sft ...`` with the rest of the line unchanged. ``NAME`` is one of the accelerate configs shipped inside the
package (``gmt_align/accelerate_configs``: ``zero2``, ``zero3``, ``fsdp2``, ``multi_gpu``, the files of
``recipes/accelerate_configs``); a relative ``deepspeed_config_file`` in a named config is read from the
package too (``gmt_align/ds_configs``, the files of ``ds_configs/``), so a wheel install needs no checkout.
Any other value is a path to an accelerate config. ``--num_processes`` alone uses accelerate's default
config where ``accelerate config`` wrote one, else the DDP config ``multi_gpu`` (accelerate without a config
would start one process on a machine without GPUs).

The recipe is checked here, once, before anything is launched: a bad one fails in one line, not once
per process.
"""

from __future__ import annotations

import importlib.resources as resources
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .common import RecipeError

__all__ = ["LAUNCH_OPTIONS", "launch", "launch_arguments", "launch_option_problems", "named_configs", "split_launch_options"]

LAUNCH_OPTIONS = ("accelerate_config", "num_processes")


def split_launch_options(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The launch options of a training command's line (``--name value`` or ``--name=value``) and the rest."""
    options, rest, argv = {}, [], list(argv)
    while argv:
        item = argv.pop(0)
        name, equals, value = item.partition("=")
        if name.startswith("--") and name[2:] in LAUNCH_OPTIONS:
            if not equals:
                if not argv or argv[0].startswith("--"):
                    raise RecipeError(f"{name} expects a value")
                value = argv.pop(0)
            options[name[2:]] = value
        else:
            rest.append(item)
    return options, rest


def _package_folder(name: str):
    return resources.files("gmt_align").joinpath(name)


def named_configs() -> list[str]:
    """The accelerate configs shipped in the package, by name."""
    return sorted(entry.name[:-5] for entry in _package_folder("accelerate_configs").iterdir()
                  if entry.name.endswith(".yaml"))


def _config_arguments(value: str) -> list[str]:
    """``--config_file PATH`` (and, for a named DeepSpeed config, its JSON from the package)."""
    if Path(value).expanduser().is_file():
        return ["--config_file", str(Path(value).expanduser())]
    if value not in named_configs():
        raise RecipeError(f"--accelerate_config: {value} is neither a file nor a named config "
                          f"({', '.join(named_configs())})")
    import yaml

    path = Path(str(_package_folder("accelerate_configs").joinpath(f"{value}.yaml")))
    arguments = ["--config_file", str(path)]
    json_file = (yaml.safe_load(path.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
    if json_file and not Path(json_file).is_absolute():
        arguments += ["--deepspeed_config_file", str(_package_folder(json_file))]
    return arguments


def launch_arguments(command: str, options: dict[str, str], rest: Sequence[str]) -> list[str]:
    """What ``accelerate launch`` is given for ``gmt-align COMMAND`` with ``options`` (see the module docstring)."""
    arguments = []
    if "accelerate_config" in options:
        arguments += _config_arguments(options["accelerate_config"])
    else:
        from accelerate.commands.config import default_config_file

        if not Path(default_config_file).is_file():
            arguments += _config_arguments("multi_gpu")
    if "num_processes" in options:
        number = options["num_processes"]
        if not number.isdigit() or int(number) < 1:
            raise RecipeError(f"--num_processes must be a whole number of processes (1 or more), got {number!r}")
        arguments += ["--num_processes", number]
    return [*arguments, "--module", "gmt_align.cli", command, *rest]


def launch_option_problems(options: dict[str, str]) -> list[str]:
    """What is wrong with ``options`` (``gmt-align validate`` takes them as the training command does)."""
    if not options:
        return []
    try:
        launch_arguments("sft", options, [])
    except RecipeError as error:
        return [str(error)]
    return []


def launch(command: str, options: dict[str, str], rest: Sequence[str],
           launch_command_fn: Callable | None = None) -> int:
    """Check the recipe, then run ``gmt-align COMMAND REST`` under ``accelerate launch`` (TRL's way: accelerate's
    parser and ``launch_command``; a test may pass its own ``launch_command_fn``). Returns the exit status."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from .recipe import parse_recipe

    if "WORLD_SIZE" in os.environ:
        raise RecipeError(f"--{' / --'.join(options)} start accelerate launch, and this process is already one of "
                          f"{os.environ['WORLD_SIZE']} started by a launcher: drop them")
    arguments = launch_arguments(command, options, rest)
    launched = _launched_environment(arguments[arguments.index("--config_file") + 1]) if "--config_file" in arguments else {}
    saved = {name: os.environ.get(name) for name in launched}
    os.environ.update(launched)
    try:  # RecipeError: one line, before any process starts (checked as the launched processes will see it)
        parse_recipe(command, rest, launching=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    parser = launch_command_parser()
    parser.error = _raise_recipe_error  # one line rather than accelerate's usage
    accelerate_args = parser.parse_args(arguments)
    print(f"gmt-align {command}: accelerate launch {' '.join(arguments[:arguments.index('--module')])} "
          f"-m gmt_align.cli {command} ...", file=sys.stderr)
    try:
        (launch_command_fn or launch_command)(accelerate_args)
    except Exception as error:  # noqa: BLE001 - a process failed: its own output says why, above
        # subprocess.CalledProcessError (one process), torch's ChildFailedError (several)
        codes = [getattr(error, "returncode", None)] + [getattr(failure, "exitcode", None)
                                                       for failure in getattr(error, "failures", {}).values()]
        code = max([c for c in codes if isinstance(c, int) and c > 0], default=1)
        print(f"gmt-align {command}: error: a launched process failed (exit status {code}); its output is above",
              file=sys.stderr)
        return code
    return 0


def _launched_environment(config_file: str) -> dict[str, str]:
    """What ``accelerate launch`` exports from an FSDP config that the recipe's checks read
    (:func:`gmt_align.backends.fsdp2.fsdp_problems`: FSDP1, FSDP next to a DeepSpeed recipe)."""
    import yaml

    try:
        config = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise RecipeError(f"--accelerate_config {config_file}: cannot be read ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or config.get("distributed_type") != "FSDP":
        return {}
    version = (config.get("fsdp_config") or {}).get("fsdp_version", 1)
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(version)}


def _raise_recipe_error(message: str):
    raise RecipeError(f"accelerate launch: {message}")
