"""Training and evaluation data as ``trl sft`` / ``trl dpo`` load them, checked before any model loads.

Sources (TRL's own keys):

- ``dataset_name``: a hub dataset (its ``dataset_train_split``) or a local ``.json``/``.jsonl``/
  ``.parquet`` file;
- ``datasets``: TRL's dataset mixture (``DatasetMixtureConfig``: entries with ``path``, ``name``,
  ``data_dir``, ``data_files``, ``split``, ``columns``, ``fraction``; ``streaming``;
  ``test_split_size``), loaded by ``trl.get_dataset``. An entry's ``path`` may also be a local file.

Evaluation during training (``eval_strategy`` other than ``no``) reads ``dataset_test_split`` as:

- a split name of the hub dataset or mixture (TRL's rule; a mixture has ``test`` when
  ``test_split_size`` is set);
- a local ``.json``/``.jsonl``/``.parquet`` file holding the evaluation rows;
- a number: the fraction (``0 < x < 1``) or count (``x >= 1``) of the training rows held out for
  evaluation, drawn with ``seed`` (the same rows on every rank) and not trained on.

Every problem with the data is a :class:`DataError`: one line naming the file, the row and what is
wrong, raised before the model loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .data_checks import check_rows
from .common import DataError, option_value

__all__ = ["DATA_FILE_FORMATS", "DataError", "data_source_problems", "eval_enabled", "held_out_size", "is_local_file",
           "load_datasets", "load_train_dataset", "option_value"]

DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_CHUNK = 1 << 20


def is_local_file(path) -> bool:
    return isinstance(path, str) and Path(path).suffix in DATA_FILE_FORMATS


def eval_enabled(training_args) -> bool:
    strategy = option_value(training_args, "eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)) != "no"


def held_out_size(split) -> float | int | None:
    """``dataset_test_split`` as a number of rows (int >= 1) or a fraction (0 < x < 1), else None."""
    try:
        number = float(split)
    except (TypeError, ValueError):
        return None
    if 0 < number < 1:
        return number
    return int(number) if number >= 1 and number.is_integer() else None


def _entry_files(entry) -> list[str]:
    """The local files a mixture entry names (its path, or its data_files)."""
    files = option_value(entry, "data_files")
    if isinstance(files, dict):
        files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value)]
    files = [files] if isinstance(files, str) else list(files or [])
    path = option_value(entry, "path")
    return [f for f in [path, *files] if is_local_file(f)]


def data_source_problems(script_args, training_args) -> list[str]:
    """What the recipe says about its data that cannot work, one line each, without reading any data."""
    problems = []
    name, mixture = option_value(script_args, "dataset_name"), option_value(script_args, "datasets") or []
    mixture = mixture if isinstance(mixture, list) else []  # not a list: the parser says so
    if not name and not mixture:
        problems.append("dataset_name or datasets is required (a hub dataset, a local .json/.jsonl/.parquet "
                        "file, or TRL's mixture of datasets)")
    if name and mixture:
        problems.append("dataset_name and datasets are both set (TRL would ignore dataset_name): keep one")
    if name and is_local_file(name) and not Path(name).expanduser().exists():
        problems.append(f"dataset_name: no such file {name} (quickstart data: make quickstart)")
    train_split = option_value(script_args, "dataset_train_split", "train")
    if name and is_local_file(name) and not mixture and train_split != "train":
        problems.append(f"dataset_train_split is {train_split!r}, but {name} is one file: all its rows train "
                        "(drop dataset_train_split)")
    for index, entry in enumerate(mixture):
        for file in _entry_files(entry):
            if not Path(file).expanduser().exists():
                problems.append(f"datasets[{index}]: no such file {file}")
    split = option_value(script_args, "dataset_test_split", "test")
    test_size = option_value(script_args, "test_split_size")
    if not eval_enabled(training_args):
        if split != "test":
            problems.append(f"dataset_test_split is {split!r} but eval_strategy is 'no': nothing would be "
                            "evaluated (set eval_strategy: steps or epoch, or drop dataset_test_split)")
        if test_size is not None:
            problems.append("test_split_size holds rows out of training but eval_strategy is 'no': set "
                            "eval_strategy: steps or epoch, or drop test_split_size")
        if option_value(training_args, "eval_on_start"):  # the Trainer would stop once the model has loaded
            problems.append("eval_on_start evaluates before the first step, but eval_strategy is 'no' (no evaluation "
                            "rows are loaded): set eval_strategy: steps or epoch, or drop eval_on_start")
        return problems
    if is_local_file(split):
        if not Path(split).expanduser().exists():
            problems.append(f"dataset_test_split: no such file {split}")
    elif held_out_size(split) is not None:
        if test_size is not None:
            problems.append("dataset_test_split holds rows out and so does test_split_size: keep one")
        if option_value(script_args, "dataset_streaming") or option_value(script_args, "streaming"):
            problems.append("dataset_test_split as a number holds rows out, which a streamed dataset cannot do")
    elif mixture and test_size is None:
        problems.append(f"eval_strategy needs an evaluation split: the mixture has no {split!r} split "
                        "(set test_split_size, or dataset_test_split to a file or a fraction to hold out)")
    elif name and is_local_file(name):
        problems.append(f"eval_strategy needs an evaluation split, but {name} is one file with no {split!r} "
                        "split: set dataset_test_split to a second file (e.g. eval.jsonl) or to a fraction "
                        "of this one to hold out (e.g. 0.05)")
    return problems


def load_datasets(script_args, training_args, method: str):
    """``(train_dataset, eval_dataset or None)`` as TRL's scripts build them, each checked for the
    columns (and rows) that ``method``'s trainer needs. Raises :class:`DataError`."""
    name, split = option_value(script_args, "dataset_name"), option_value(script_args, "dataset_test_split", "test")
    if option_value(script_args, "datasets"):
        where, splits = "datasets (the mixture)", _load_mixture(script_args)
    elif is_local_file(name):  # one file: its rows are the training split
        where, splits = name, {option_value(script_args, "dataset_train_split", "train"): _read_local(
            name, "dataset_name", streaming=bool(option_value(script_args, "dataset_streaming")))}
    else:
        where, splits = name, _load_hub(script_args)
    train = _pick(splits, option_value(script_args, "dataset_train_split", "train"), where)
    train = check_rows(train, method, script_args, training_args, where)
    eval_dataset = None
    if eval_enabled(training_args):
        if is_local_file(split):
            eval_dataset = check_rows(_read_local(split, "dataset_test_split"), method, script_args,
                                      training_args, split)
        elif held_out_size(split) is not None:
            train, eval_dataset = _hold_out(train, held_out_size(split), option_value(training_args, "seed", 42), where)
        else:
            eval_dataset = check_rows(_pick(splits, split, where), method, script_args, training_args,
                                      f"{where} (split {split})")
    return _to_prompt_completion(train, script_args), \
        None if eval_dataset is None else _to_prompt_completion(eval_dataset, script_args)


def load_train_dataset(script_args):
    """The training rows of ``dataset_name`` only, unchecked and unsplit (kept for scripts and tests)."""
    name = option_value(script_args, "dataset_name")
    train = _read_local(name, "dataset_name") if is_local_file(name) else \
        _pick(_load_hub(script_args), option_value(script_args, "dataset_train_split", "train"), name)
    return _to_prompt_completion(train, script_args)


def _load_hub(script_args):
    from datasets import load_dataset

    name = option_value(script_args, "dataset_name")
    try:
        return load_dataset(name, name=option_value(script_args, "dataset_config"),
                            streaming=bool(option_value(script_args, "dataset_streaming")))
    except Exception as error:  # noqa: BLE001 - hub or builder failure: say it in one line
        raise DataError(f"dataset_name {name}: cannot be loaded ({_first_line(error)})") from None


def _pick(splits, split: str, where: str):
    if split not in splits:
        raise DataError(f"{where}: no split {split!r} (it has {', '.join(splits) or 'none'})")
    return splits[split]


def _load_mixture(script_args):
    """``trl.get_dataset`` on the mixture; a local file named as an entry's path is read as its format."""
    import dataclasses

    from trl import get_dataset

    entries = []
    for entry in script_args.datasets:
        if is_local_file(entry.path) and entry.data_files is None:
            entry = dataclasses.replace(entry, path=DATA_FILE_FORMATS[Path(entry.path).suffix],
                                        data_files=str(Path(entry.path).expanduser()))
        entries.append(entry)
    for entry in entries:
        for file in _entry_files(entry):
            if DATA_FILE_FORMATS[Path(file).suffix] == "json":
                _check_json_file(Path(file).expanduser())
    mixture = copy.copy(script_args)
    mixture.datasets = entries
    try:
        return get_dataset(mixture)
    except Exception as error:  # noqa: BLE001 - a hub or builder failure: one line
        raise DataError(f"datasets: the mixture cannot be loaded ({_first_line(error)})") from None


def _read_local(path: str, key: str, streaming: bool = False):
    """A local JSON/JSONL/parquet file as one split; every reading problem is a :class:`DataError`."""
    from datasets import load_dataset

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{key}: no such file {path}")
    builder = DATA_FILE_FORMATS[file.suffix]
    if builder == "json":
        _check_json_file(file)
    try:
        dataset = load_dataset(builder, data_files=str(file), split="train", streaming=streaming)
    except Exception as error:  # noqa: BLE001 - e.g. a column that changes type between rows
        raise DataError(f"{path}: cannot be read as {builder} ({_first_line(error)})") from None
    if not streaming and len(dataset) == 0:
        raise DataError(f"{path}: no rows")
    return dataset


def _check_json_file(file: Path) -> None:
    """Every row of a JSON / JSON Lines file is UTF-8 text holding one JSON object, and there is one.

    datasets would replace bad bytes, read a line ``[1, 2]`` as a column named ``text``, stop with
    ``StopIteration`` on an empty file, or fail without naming the line. One pass, before loading
    (about 1 s per 100 MB).
    """
    with open(file, "rb") as stream:
        head = stream.read(_CHUNK).lstrip()
    if not head:
        raise DataError(f"{file}: empty file (no rows)")
    if file.suffix == ".json" and head.startswith(b"["):  # one JSON array of rows
        text = _decode(file.read_bytes(), file, 1)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{file} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None) if isinstance(rows, list) else 0
        if bad is not None:
            raise DataError(f"{file} row {bad + 1}: a JSON object per row is expected")
        if not rows:
            raise DataError(f"{file}: no rows (an empty JSON array)")
        return
    rows = 0
    with open(file, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            line = _decode(raw, file, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file} line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{file} line {number}: a JSON object per line is expected, got {type(row).__name__}")
            rows += 1
    if not rows:
        raise DataError(f"{file}: empty file (no rows)")


def _decode(raw: bytes, file: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line += raw[: error.start].count(b"\n")
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{file} line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {column})") from None


def _hold_out(train, size, seed: int, where: str):
    """``size`` rows (a count, or a fraction rounded up) drawn with ``seed`` become the evaluation
    rows, the rest train (``datasets``' ``train_test_split``, seeded: the same rows on every rank; its
    index files are written atomically, so ranks that write the same one do not race)."""
    import math

    if not hasattr(train, "train_test_split"):
        raise DataError(f"{where}: a streamed dataset cannot hold rows out (dataset_test_split as a number)")
    n = len(train)
    count = size if isinstance(size, int) else math.ceil(size * n)
    if count >= n:
        raise DataError(f"{where}: dataset_test_split holds out {count} of its {n} rows: none left to train on")
    split = train.train_test_split(test_size=count, seed=seed)
    return split["train"], split["test"]


def _to_prompt_completion(dataset, script_args):
    """Two text columns (dataset_prompt_column / dataset_completion_column) as TRL's conversational
    prompt/completion: one user turn, one assistant turn; other columns dropped."""
    prompt, completion = option_value(script_args, "dataset_prompt_column"), option_value(script_args, "dataset_completion_column")
    if prompt is None:
        return dataset
    return dataset.map(
        lambda row: {
            "prompt": [{"role": "user", "content": row[prompt]}],
            "completion": [{"role": "assistant", "content": row[completion]}],
        },
        remove_columns=list(dataset.column_names or [prompt, completion]),
    )


def _first_line(error: BaseException) -> str:
    """The innermost cause's first line (datasets wraps the real reason in a generic one)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
