"""Local parallel map for the data tools (synth writes, prepare's scan and copies).

Small images make this CPU-bound Python work, which threads cannot speed up (the GIL), so big jobs fork worker
processes. Forking is only done when it is safe and cheap: on platforms with ``fork``, when this process runs no
other Python thread and has not loaded Ray (whose threads a fork would copy mid-flight). Fork never re-runs the
caller's ``__main__`` (spawn and forkserver do, which breaks unguarded scripts) and its workers start in
milliseconds because they inherit the imported modules. Otherwise, and for I/O-bound work, a thread pool is used.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from raydefect import console


def fork_is_safe() -> bool:
    """Forking copies only this thread: fine when it is the only one and Ray (C++ threads) is not loaded."""
    return "fork" in mp.get_all_start_methods() and threading.active_count() == 1 and "ray" not in sys.modules


def cpu_workers() -> int:
    """Cores this process may run on (a cpuset/taskset limit included): the one core count every default uses."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parallel_map(
    fn: Callable[[Any], Any],
    items: Sequence,
    workers: int,
    processes_from: int | None = 1000,
    threads_from: int | None = None,
    progress: str | None = None,
) -> list:
    """``list(map(fn, items))`` in order: on `workers` forked processes when there are at least `processes_from`
    items and forking is safe, else on threads from `threads_from` items, else in this thread.

    With `progress`, a `console.Progress` named so (a bar on a terminal, else a line every few seconds).
    """
    pool: Executor | None = None
    results: Iterable
    n = len(items)
    if workers > 1 and processes_from is not None and n >= processes_from and fork_is_safe():
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        results = pool.map(fn, items, chunksize=max(16, min(256, n // (workers * 8))))
    elif workers > 1 and threads_from is not None and n >= threads_from:
        pool = ThreadPoolExecutor(workers)
        results = pool.map(fn, items)
    else:
        results = map(fn, items)
    out = []
    bar = console.Progress(progress, n) if progress else None
    try:
        for r in results:
            out.append(r)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out
