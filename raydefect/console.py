"""Console output with one verbosity knob (-v/-q), shared by the CLI and long-running jobs.

Levels: -1 quiet (errors and final results only), 0 normal, 1+ verbose (Ray's own logs too).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_verbosity = 0


def format_number(value: Any, digits: int = 3) -> str:
    """A number for people (reports, plot legends): "n/a" when missing or not finite, yes/no for a bool, a whole
    number with thousands separators, else `digits` decimals."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` with its noun in the right number: "1 image", "12,345 images" (``plural`` for an irregular one)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def set_verbosity(level: int) -> None:
    global _verbosity
    _verbosity = level
    logging.basicConfig(
        level=logging.DEBUG if level >= 2 else logging.INFO if level >= 1 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def verbosity() -> int:
    return _verbosity


#: Whether third-party notices may be moved off the console into a log file (`pipelines.cluster.route_notices`):
#: only in the `raydefect` command itself, never in a library call or a test, whose stderr is not ours to move.
_route_notices = False


def allow_notice_routing(enabled: bool = True) -> None:
    global _route_notices
    _route_notices = enabled


def notice_routing() -> bool:
    return _route_notices and _verbosity < 1


#: Progress bars drawn now: a line printed meanwhile goes through tqdm.write, above the bar, not through it.
_bars: list[Any] = []


def _print(message: str, file: Any = None) -> None:
    if _bars:
        from tqdm import tqdm

        tqdm.write(message, file=file or sys.stdout)
    else:
        print(message, file=file, flush=True)


def info(message: str) -> None:
    """Normal progress output (hidden by -q)."""
    if _verbosity >= 0:
        _print(message)


def result(message: str) -> None:
    """Final results: always shown."""
    _print(message)


def debug(message: str) -> None:
    """Detail shown with -v."""
    if _verbosity >= 1:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    _print(f"warning: {message}", file=sys.stderr)


def table(
    rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4g", formats: dict[str, str] | None = None
) -> str:
    """A plain fixed-width text table (no dependency), for summaries on the console. `formats` gives some columns'
    float format (e.g. {"defect %": ".1f"}: 87.0 stays "87.0" beside "89.4", not "87")."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    formats = formats or {}

    def fmt(v: object, column: str) -> str:
        if isinstance(v, float):
            return format(v, formats.get(column, floatfmt))
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c), c) for c in columns] for r in rows]
    # numbers right-aligned, text (paths, names) left-aligned, so both read down the column
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) in (None, "") for r in rows) for c in columns]
    widths = [max(_width(c), *(_width(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def pad(v: str, w: int, right: bool) -> str:
        return " " * (w - _width(v)) + v if right else v + " " * (w - _width(v))

    lines = ["  ".join(pad(c, w, r) for c, w, r in zip(columns, widths, numeric, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(pad(v, w, r) for v, w, r in zip(row, widths, numeric, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _width(text: str) -> int:
    """Terminal columns of `text`: East Asian wide and full-width characters take two (a folder named in Japanese
    would otherwise push its row out of line), combining marks none."""
    import unicodedata

    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text
    )


@contextmanager
def timed(label: str) -> Iterator[dict]:
    """Measure a block; ``with timed("prepare") as t: ...`` then ``t["seconds"]``."""
    box: dict = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start
        debug(f"{label}: {box['seconds']:.2f}s")


@contextmanager
def waiting(message: str, after: float) -> Iterator[None]:
    """Print `message` (`info`) once if the block is still running `after` seconds on: a wait on something that has
    not answered (a store, a cluster) then reads as a wait, not as a hang. Nothing is printed for a faster block."""
    timer = threading.Timer(after, info, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


#: Seconds between two plain progress lines when the output is not a terminal (cron, Ray Jobs logs, a file).
PLAIN_EVERY_S = 10.0


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}")  # fmt: skip


class Progress:
    """One progress display for long work, the same in every command: a tqdm bar (count, percent, rate, ETA) when
    `stream` (default stderr) is a terminal; else a plain line every `every` seconds and one at the end, with no
    ANSI codes or carriage returns, so that cron mail and Ray Jobs logs read line by line. Hidden by -q.

    ``total`` may be unknown at first (`set_total` once it is: score's listing); `note` adds a short text (the best
    trial so far)."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "image",
        *,
        stream: Any = None,
        every: float = PLAIN_EVERY_S,
    ) -> None:
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = self._shown = 0
        self.text = ""
        self.start = self._last = time.monotonic()
        self.enabled = _verbosity >= 0
        isatty = getattr(self.stream, "isatty", None)
        self.bar: Any = None
        self._lock = threading.Lock()
        if self.enabled and callable(isatty) and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}s", file=self.stream, dynamic_ncols=True,
                            mininterval=0.5, smoothing=0.1, leave=True)  # fmt: skip
            _bars.append(self.bar)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
                self.bar.refresh()

    def note(self, text: str) -> None:
        with self._lock:
            self.text = text
            if self.bar is not None:
                self.bar.set_postfix_str(text, refresh=True)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.enabled and time.monotonic() - self._last >= self.every:
                self._line()

    def set_done(self, done: int) -> None:
        """The count so far, from a counter kept elsewhere (score's actor, a training rank's file)."""
        self.update(done - self.done)

    def line(self) -> str:
        """The plain progress line: "score: 120/400 images (30%), 12.3 images/s, ETA 0:22"."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        counted = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        text = f"{self.desc}: {counted} {self.unit}{'' if (self.total or self.done) == 1 else 's'}"
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else math.inf
            text += f" ({100 * self.done / self.total:.0f}%), {rate:,.1f} {self.unit}s/s, ETA {_eta(left)}"
        else:
            text += f", {rate:,.1f} {self.unit}s/s"
        return text + (f", {self.text}" if self.text else "")

    def _line(self) -> None:
        self._last = time.monotonic()
        self._shown = self.done
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                _bars.remove(self.bar)
                self.bar = None
            elif self.enabled and self.done and self.done != self._shown:  # the last state, once
                self._line()
            self.enabled = False


@contextmanager
def progress(desc: str, total: int | None = None, unit: str = "image", **kwargs: Any) -> Iterator[Progress]:
    """``with progress("predict", len(paths)) as bar: ... bar.update(len(batch))`` (see `Progress`)."""
    bar = Progress(desc, total, unit, **kwargs)
    try:
        yield bar
    finally:
        bar.close()
