"""The columns and rows each trainer needs, checked on the loaded data before the model loads.

TRL's trainers would otherwise stop deep in their preprocessing with ``KeyError: 'text'`` or a
``TypeError`` on a null, after the model has loaded. What is needed:

- SFT (TRL's formats, in TRL's order): ``messages`` (or ShareGPT's ``conversations``), the
  ``dataset_text_field`` (``text``), or ``prompt`` and ``completion``. A tokenized dataset
  (``input_ids``) and ``dataset_kwargs: {skip_prepare_dataset: true}`` are taken as they are.
- DPO: ``chosen`` and ``rejected`` (``prompt`` is optional: TRL extracts an implicit one).
- GRPO: ``prompt``, and every column a reward function takes by name without a default (TRL hands
  each reward function the data's columns by name: ``arithmetic_accuracy`` reads ``answer``).
- With ``dataset_prompt_column`` / ``dataset_completion_column``: those two columns.

A row where a needed column is missing (null: JSON Lines rows need not share their keys) or a
conversation is empty is named by its number, and by its line in a ``.jsonl`` file; so is a turn
whose role is not one of TRL's (:data:`ROLES`: chat templates would render ``wizard`` as a speaker,
or fail on it, after the model has loaded). These checks are vectorised over the Arrow columns the
trainer reads (one pass over the roles, no loop over rows): about 0.02 s per million turns.
"""

from __future__ import annotations

from pathlib import Path

from .common import DataError, option_value

__all__ = ["ROLES", "check_rows", "needed_columns", "reward_columns"]

ROLES = ("system", "user", "assistant", "tool")
"""The roles TRL's conversational formats take (``trl.data_utils``: "Expected 'system', 'user', 'assistant',
or 'tool'"); ShareGPT's ``from`` keys are read as roles, as TRL renames them."""


def needed_columns(method: str, columns: list[str], script_args, training_args, where: str) -> list[str]:
    """The columns the trainer will read (empty: nothing to check); :class:`DataError` if absent."""
    have = f"it has: {', '.join(columns) or 'no columns'}"
    prompt, completion = option_value(script_args, "dataset_prompt_column"), option_value(script_args, "dataset_completion_column")
    if prompt is not None:
        for key, column in (("dataset_prompt_column", prompt), ("dataset_completion_column", completion)):
            if column not in columns:
                raise DataError(f"{where}: no column {column!r} ({key}); {have}")
        return [prompt, completion]
    if method == "grpo":
        needed = ["prompt", *reward_columns(script_args)]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{where}: GRPO needs the column(s) {', '.join(map(repr, missing))} (the prompt, and "
                            f"what the reward functions read by name); {have}")
        return needed
    if method == "dpo":
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise DataError(f"{where}: DPO needs 'chosen' and 'rejected' columns, and {' and '.join(map(repr, missing))} "
                            f"{'is' if len(missing) == 1 else 'are'} missing; {have}")
        return [c for c in ("prompt", "chosen", "rejected") if c in columns]
    kwargs = option_value(training_args, "dataset_kwargs") or {}
    if "input_ids" in columns or kwargs.get("skip_prepare_dataset"):
        return []
    text = option_value(training_args, "dataset_text_field", "text")
    for needed in (["messages"], ["conversations"], [text], ["prompt", "completion"]):
        if all(c in columns for c in needed):
            return needed
    hint = "has 'prompt' but no 'completion'" if "prompt" in columns else have
    raise DataError(f"{where}: no SFT column: TRL's SFT reads 'messages', {text!r} (plain text), or 'prompt' and "
                    f"'completion' ({hint}; two text columns can be named with dataset_prompt_column and "
                    "dataset_completion_column)")


# What TRL's GRPOTrainer passes to every reward function besides the data's columns.
_GIVEN_TO_REWARDS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                     "environments"}


def reward_columns(script_args) -> list[str]:
    """The columns the recipe's reward functions take by name without a default (a reward model reads
    none), in order, each once."""
    import inspect

    from .rewards import resolve_reward

    columns: list[str] = []
    for name in option_value(script_args, "reward_funcs") or []:
        for parameter in inspect.signature(resolve_reward(name)).parameters.values():
            if (parameter.default is parameter.empty and parameter.name not in _GIVEN_TO_REWARDS
                    and parameter.name not in columns
                    and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)):
                columns.append(parameter.name)
    return columns


def check_rows(dataset, method: str, script_args, training_args, where: str):
    """``dataset`` unchanged if every row has what ``method`` needs; else :class:`DataError`."""
    columns = dataset.column_names
    if columns is None:  # a streamed dataset: its first row's keys (rows are not read ahead)
        first = next(iter(dataset), None)
        if first is None:
            raise DataError(f"{where}: no rows")
        columns = list(first)
    needed = needed_columns(method, list(columns), script_args, training_args, where)
    from datasets import Dataset

    if not needed or not isinstance(dataset, Dataset):  # streamed: rows are not read ahead
        return dataset
    if len(dataset) == 0:
        raise DataError(f"{where}: no rows")
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.select_columns(needed).with_format("arrow")[:]
    for column in needed:
        values = table.column(column)
        if column in ("messages", "conversations") and pa.types.is_string(values.type):
            raise DataError(f"{where}: {column!r} must be a list of {{role, content}} turns, but holds text "
                            f"(row {_row(where, 0)}); plain text goes in a 'text' column")
        missing = pc.is_null(values)
        bad = missing
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):  # a conversation with no turn
            bad = pc.or_(missing, pc.fill_null(pc.equal(pc.list_value_length(values), 0), False))
        first = pc.index(bad, True).as_py()
        if first >= 0:
            count = pc.sum(bad).as_py()
            what = "no" if missing[first].as_py() else "an empty"
            raise DataError(f"{where} row {_row(where, first)}: {what} {column!r}"
                            + (f" ({count} such rows)" if count > 1 else ""))
        _check_roles(values, column, where)
    return dataset


def _check_roles(values, column: str, where: str) -> None:
    """Every turn of a conversational column has one of :data:`ROLES` (:class:`DataError` naming the
    first row that does not, and how many do not)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) \
            or not pa.types.is_struct(values.type.value_type):
        return
    keys = [values.type.value_type.field(i).name for i in range(values.type.value_type.num_fields)]
    key = "role" if "role" in keys else "from" if "from" in keys else None
    if key is None:
        raise DataError(f"{where}: the turns of {column!r} have no 'role' (they have: {', '.join(keys)})")
    turns = pc.list_flatten(values)
    roles = pc.struct_field(turns, key)
    bad = pc.invert(pc.fill_null(pc.is_in(roles, value_set=pa.array(ROLES)), False))
    first = pc.index(bad, True).as_py()
    if first < 0:
        return
    row = pc.list_parent_indices(values)[first].as_py()
    rows = len(set(pc.filter(pc.list_parent_indices(values), bad).to_pylist()))
    role = roles[first].as_py()
    found = f"the role {role!r}" if role is not None else "a turn with no role"
    raise DataError(f"{where} row {_row(where, row)}: {column!r} has {found}; TRL takes {', '.join(ROLES)}"
                    + (f" ({rows} such rows)" if rows > 1 else ""))


def _row(where: str, index: int) -> str:
    """Row ``index`` (0-based) as users find it: its number, and its line in a JSON Lines file."""
    path = Path(where).expanduser()
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return str(index + 1)
    with open(path, encoding="utf-8") as lines:
        seen = -1
        for number, line in enumerate(lines, 1):
            if line.strip():
                if number == 1 and line.lstrip().startswith("["):
                    break  # a JSON array: rows are not lines
                seen += 1
                if seen == index:
                    return f"{index + 1} (line {number})"
    return str(index + 1)
