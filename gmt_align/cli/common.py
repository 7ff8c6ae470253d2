"""What the command line's checks share: their two errors (each message one line, printed as
``gmt-align CMD: error: ...`` with exit status 2, before any model loads), how they read an option,
and the checks of files and folders that more than one command makes (weights, a folder to write in)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataError", "RecipeError", "option_value", "unwritable_problem", "weights_problem", "yaml_error"]


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message is one line naming the culprit."""


class DataError(ValueError):
    """Data that cannot train: the message is one line naming the file, the row and the problem."""


def option_value(obj, name: str, default=None):
    """A field of parsed arguments, of a raw recipe namespace (validate), or of a mixture entry (dict)."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, default)
    return default if value is None and default is not None else value


def yaml_error(path, error) -> str:
    """A YAML parse error in one line naming the file, line and column: ``FILE line 3 column 16: not valid
    YAML (while parsing a flow sequence: expected ',' or ']', but got '<scalar>')``."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark is not None else str(path)
    what = "; ".join(part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
    return f"{where}: not valid YAML ({what or str(error).splitlines()[0]})"


def weights_problem(directory) -> str | None:
    """The first ``*.safetensors`` file of a model folder whose header safetensors cannot read (a copy
    or download cut short, or not a safetensors file at all), in one line; else None. Reads each
    file's header only (its first bytes; the tensors are memory-mapped, not read)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(directory).expanduser().glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            reason = str(error).removeprefix("Error while deserializing header: ")
            return (f"{file} is not a readable safetensors file ({reason}): a copy or download cut short? "
                    "copy or save the model again")
    return None


def unwritable_problem(key: str, path) -> str | None:
    """One line if nothing can be written at ``path`` (a folder, made if missing): a file created
    and removed in it, or in its nearest existing parent. Else None."""
    import tempfile

    existing = Path(path).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}: {existing} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".gmt-align-write-check-"):
            pass
    except OSError as error:
        return f"{key}: cannot write in {existing} ({error.strerror or error}): choose a folder you can write to"
    return None
