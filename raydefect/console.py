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


def info(message: str) -> None:
    """Normal progress output (hidden by -q)."""
    if _verbosity >= 0:
        print(message, flush=True)


def result(message: str) -> None:
    """Final results: always shown."""
    print(message, flush=True)


def debug(message: str) -> None:
    """Detail shown with -v."""
    if _verbosity >= 1:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
