"""What the command line's checks share: their two errors (each message one line, printed as
``gmt-align CMD: error: ...`` with exit status 2, before any model loads) and how they read an option."""

__all__ = ["DataError", "RecipeError", "option_value", "yaml_error"]


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
