"""Stopping a driver cleanly: SIGTERM behaves as Ctrl-C (the run commits what it holds and is marked interrupted),
and a commit in progress is never cut in half by either."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raydefect import console
from raydefect.errors import Terminated


@contextmanager
def handle_signals(handler: Callable[[int, Any], None], *signums: int) -> Iterator[None]:
    """`handler` for `signums` over the block, the previous handlers after it. Main thread only, as Python's signal
    handlers (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, p in previous.items():
            signal.signal(n, p if p is not None else signal.SIG_DFL)


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """What a stopping signal raises in the driver: `Terminated` for SIGTERM (exit 143), else KeyboardInterrupt."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) in the driver, so the run commits what it holds and is marked
    interrupted as on Ctrl-C (measured: Ray's own handler printed a C++ stack twice, aborted, and left the run marked
    failed with its last files uncommitted)."""

    def handler(signum: int, frame: Any) -> None:
        raise interrupt_for(signum)

    return handle_signals(handler, signal.SIGTERM)


class CommitGuard:
    """Ctrl-C and SIGTERM wait for a commit in progress to end: cut between moving a file and recording it, the run's
    final commit repeated the move of a file already moved (measured: "No such file or directory", a traceback,
    exit 1 instead of 130). The signal is raised once the commit is done; a second one during the commit stops at
    once (`forced`: the run commits nothing more, and the next run adopts what this commit moved). Main thread only,
    as Python's signal handlers."""

    def __init__(self) -> None:
        self.forced = False

    @contextmanager
    def hold(self, stopping: bool = False) -> Iterator[None]:
        """Defer SIGINT/SIGTERM over the block; `stopping` (the final commit of a run already stopping): a signal
        forces at once."""
        received: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            if received or stopping:
                self.forced = True
                console.warn("stopping at once, in the middle of a commit: the next run finishes it")
                raise interrupt_for(signum)
            received.append(signum)
            console.warn("stopping after the commit in progress (again to stop at once)")

        with handle_signals(handler, signal.SIGINT, signal.SIGTERM):
            yield
        if received:
            raise interrupt_for(received[0])
