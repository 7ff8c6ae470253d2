"""One live run per ``output_dir``: a lock held for the run's life, released by the kernel if it dies.

Two runs started at once into one folder would both pass the checks of :mod:`gmt_align.training.runs`
(neither sees the other's run yet) and then mix: two run ids in ``gmt_stats.jsonl``, each overwriting
the other's checkpoints. So a run first takes ``OUTPUT_DIR/.gmt_run.lock`` with ``fcntl.flock``
(exclusive, without waiting) and keeps it open until the process ends; the second run is refused in
one line naming the folder and the holder (pid, host, start time, written into the file), before any
model loads. The kernel drops a flock when its holder dies, ``kill -9`` included, so a killed run never
blocks the next one (a child it forked, such as a DataLoader worker, shares the lock until it exits too);
the file itself stays (removing it would let two runs lock two different files).

Of a run's processes only the first (global rank 0, the one that writes ``gmt_stats.jsonl``) takes the
lock; every rank learns the outcome through one all-reduce and stops together. On a filesystem shared
by several nodes this holds where ``flock`` works across machines (NFS; Lustre mounted with ``flock``);
where the filesystem refuses locks, the run goes on with a warning that the folder is not guarded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from .runs import RunFolderError

__all__ = ["LOCK_FILE", "RunInUseError", "claim_run_folder", "holder", "in_use", "release_run_folder"]

LOCK_FILE = ".gmt_run.lock"
_HELD: dict[str, int] = {}  # realpath of output_dir -> the open, flocked descriptor of its lock file
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_TRIES, _PAUSE_S = 5, 0.2  # a `gmt-align validate` probing the lock holds it for microseconds


class RunInUseError(RunFolderError):
    """``output_dir`` is held by another live run (one line)."""


def _key(output_dir) -> str:
    return os.path.realpath(os.path.expanduser(str(output_dir)))


def holder(output_dir) -> str:
    """Who holds (or last held) the folder's lock, as written into the lock file: ``pid 123 on host
    gpu7, started 2026-12-07T13:00:00Z``; ``an unknown process`` if the file says nothing readable."""
    try:
        info = json.loads((Path(output_dir) / LOCK_FILE).read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _busy_message(output_dir) -> str:
    return (f"output_dir {output_dir} is in use by another run ({holder(output_dir)}); two runs must not share a "
            "folder: wait for it to end (or stop it), or choose another output_dir")


def _try_lock(output_dir) -> str | None:
    """Take the lock (or find it already held by this process); the refusal's message if another holds it."""
    key = _key(output_dir)
    if key in _HELD:
        return None
    os.makedirs(key, exist_ok=True)
    fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt + 1 == _TRIES:
                os.close(fd)
                return _busy_message(output_dir)
            time.sleep(_PAUSE_S)
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            os.close(fd)
            warnings.warn(f"gmt-align: this filesystem refuses file locks ({error.strerror}); two runs started at once "
                          f"into {output_dir} would not be refused", stacklevel=3)
            return None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = fd
    return None


def claim_run_folder(args) -> bool:
    """Hold ``args.output_dir`` for this run (every rank calls it; collective when there are several).

    Returns whether this call took the lock (``False``: this process held it already, or it is not
    rank 0). Raises :class:`RunInUseError` on every rank when another live run holds the folder.
    """
    import torch

    from gmt_align.core.distributed import AllReduce

    first = args.process_index == 0  # sets up the process group, as the Trainer would
    already = _key(args.output_dir) in _HELD
    problem = _try_lock(args.output_dir) if first else None
    if AllReduce()(torch.tensor([problem is not None], dtype=torch.int64)).item():
        raise RunInUseError(problem or _busy_message(args.output_dir))
    return first and not already and _key(args.output_dir) in _HELD


def release_run_folder(output_dir) -> None:
    """Let another run use ``output_dir`` (the lock goes anyway when the process ends)."""
    fd = _HELD.pop(_key(output_dir), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def in_use(output_dir) -> str | None:
    """One line if a live run holds ``output_dir`` now (``gmt-align validate``); takes nothing, creates nothing."""
    path = Path(output_dir) / LOCK_FILE
    if _key(output_dir) in _HELD or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _busy_message(output_dir)
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the shared lock, if taken
    return None
