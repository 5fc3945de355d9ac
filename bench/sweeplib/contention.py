"""CPU contention: other busy processes on the machine while a case is timed.

Users run on shared machines (CI runners, notebooks, a data loader in the same process), where
a path made of many small parallel ops loses most: each OpenMP barrier waits for a descheduled
thread. A case with ``contention=N`` (or the sweep's ``--contention N``) is timed while N
processes spin in a pure-Python loop, each keeping one core busy at normal priority. They start
before the case's tensors are built and are killed when it ends.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time

BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def contention(n: int):
    """Run ``n`` CPU-bound processes for the duration of the ``with`` block (none for 0)."""
    procs = []
    try:
        for _ in range(max(0, int(n))):
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP],
                                          stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        if procs:
            time.sleep(0.2)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
