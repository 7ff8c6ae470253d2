"""Tests only: with this folder first on ``PYTHONPATH`` and ``GMT_TEST_EXIT_THREADS=1``, each launched
rank prints, as the interpreter begins to shut down, the threads it still runs:

    gmt-test: rank 1 threads at exit: jemalloc_bg_thd python

Registered here, at start-up, the handler runs after every other ``atexit`` handler (they run last in,
first out), which is where a process group's gloo threads must already be gone: one left running
past this point can abort a finished run ("terminate called without an active exception").
"""

import atexit
import os
import sys

if os.environ.get("GMT_TEST_EXIT_THREADS") == "1" and "RANK" in os.environ:

    def _threads_at_exit() -> None:
        tasks = f"/proc/{os.getpid()}/task"
        names = []
        for task in os.listdir(tasks):
            try:
                with open(f"{tasks}/{task}/comm") as comm:
                    names.append(comm.read().strip())
            except OSError:  # a thread that ended meanwhile
                pass
        # One write(2) of a short line is not interleaved with another rank's on the shared pipe (print
        # writes the text and its newline apart); the leading newline ends whatever the rank printed last.
        sys.stderr.flush()
        line = f"\ngmt-test: rank {os.environ['RANK']} threads at exit: {' '.join(sorted(names))}\n"
        os.write(2, line.encode())

    atexit.register(_threads_at_exit)
