"""``OUTPUT_DIR/gmt_stats.jsonl``: one JSON object per logging step, tied to one run.

Every record carries ``run_id`` (made when a run starts, saved in each checkpoint as
``gmt_run.json``) and ``step``. A run resumed from ``checkpoint-N`` keeps its run id and first drops
the records after step N, which it logs again; a new run never appends to a file that holds another
run. Reading is strict: an empty file, a malformed line (named by file and line number) or a second
run id is a :class:`TelemetryStateError`, one line, which ``gmt-align`` turns into exit status 2.
This module imports no torch: ``gmt-align report`` stays fast.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path

__all__ = [
    "RUN_FILE", "STATS_FILE", "TelemetryStateError", "append_record", "continue_run", "new_run_id",
    "read_records", "read_run_id", "runs_of", "write_run_id",
]

STATS_FILE = "gmt_stats.jsonl"
RUN_FILE = "gmt_run.json"  # in each checkpoint: {"run_id": ...}


class TelemetryStateError(ValueError):
    """A telemetry file (``gmt_stats.jsonl``, or a checkpoint's ``gmt_telemetry_rank*.pt`` /
    ``gmt_run.json``) that cannot be used as it is; the message is one line naming the file."""


def new_run_id() -> str:
    """Sortable and unique enough: start time (UTC) and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def read_records(path: str | Path, drop_torn_tail: bool = False) -> list[dict]:
    """The records of a stats file in file order; raises :class:`TelemetryStateError` for a malformed
    line. ``drop_torn_tail``: a last line without its newline that does not parse (a run killed
    while writing it) is dropped with a warning instead — used on resume, when it is logged again."""
    text = Path(path).read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if drop_torn_tail and number == len(lines):  # no newline after it: torn by a kill
                warnings.warn(f"{path}:{number}: dropped a truncated last record", stacklevel=2)
                break
            raise TelemetryStateError(f"{path}:{number}: not a JSON record ({error.msg}); truncated or edited?") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise TelemetryStateError(f"{path}:{number}: not a gmt telemetry record (no integer 'step')")
        records.append(record)
    return records


def runs_of(records: list[dict]) -> list[str | None]:
    """The run ids in order of first appearance (``None``: records written before run ids existed)."""
    return list(dict.fromkeys(record.get("run_id") for record in records))


def continue_run(path: str | Path, run_id: str | None, resume_step: int | None) -> str:
    """Make ``path`` ready for the records of a run; returns the run id to write.

    A new run (``resume_step`` None) gets ``run_id``; the file must not hold records. A resumed
    run keeps ``run_id`` (from the checkpoint; None if the checkpoint holds none: the file's run,
    or a new id), and the records after ``resume_step`` are removed (rewritten atomically).
    Raises :class:`TelemetryStateError` when the file holds another run.
    """
    path = Path(path)
    records = read_records(path, drop_torn_tail=resume_step is not None) if path.is_file() else []
    runs = runs_of(records)
    if resume_step is None:
        if records:
            steps = f"steps {records[0]['step']}..{records[-1]['step']}"
            raise TelemetryStateError(
                f"{path} already holds the figures of run {runs[-1]} ({steps}); a new run never appends to "
                f"another's: use a new output_dir, or overwrite_output_dir: true to replace it")
        path.unlink(missing_ok=True)  # an empty file: nothing to keep
        return run_id or new_run_id()
    if run_id is None:  # a checkpoint from before run ids: it continues the file's run
        run_id = runs[0] if len(runs) == 1 and runs[0] is not None else new_run_id()
    others = [run for run in runs if run is not None and run != run_id]
    if others:
        raise TelemetryStateError(
            f"{path} holds the figures of run {others[0]}, not of run {run_id} being resumed: "
            f"resume into the run's own output_dir, or use a new one")
    kept = [{**record, "run_id": run_id} for record in records if record["step"] <= resume_step]
    if path.is_file():
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(partial, path)
    return run_id


def append_record(path: str | Path, record: dict) -> None:
    """One line per logging step, written whole (one ``write`` of a complete line)."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def write_run_id(checkpoint: str | Path, run_id: str) -> None:
    partial = Path(checkpoint) / (RUN_FILE + ".partial")
    partial.write_text(json.dumps({"run_id": run_id}) + "\n")
    os.replace(partial, Path(checkpoint) / RUN_FILE)


def read_run_id(checkpoint: str | Path) -> str | None:
    """The run id saved in a checkpoint, or None if it holds none (saved before run ids existed)."""
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text())["run_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TelemetryStateError(f"{path}: unreadable ({type(error).__name__}); truncated or edited?") from None
    if not isinstance(run_id, str):
        raise TelemetryStateError(f"{path}: run_id must be a string, got {run_id!r}")
    return run_id
