"""Deterministic, stratified, stable train/val/test splits.

Why exact quotas in hash order: per class, each split gets its share of the images exactly (largest remainder,
and at least one image in every split a class is entitled to), which keeps small val/test sets representative;
images are taken in the order of a hash of ``(seed, sha1)``, so the split depends on content, not on file names
or listing order, and duplicates (same sha1) land together. Stability comes from `previous` (`prepare` reads it
from the old manifest when re-preparing into the same folder): old images keep their split, new ones fill what
each split lacks, so the class stays stratified as it grows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from raydefect.errors import DataError

SPLITS = ("train", "val", "test")
# A class must have a split when it would get at least half an image by its fraction (val/test at 0.1: n >= 5).
MIN_EXPECTED = 0.5


def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1); three fractions >= 0 summing to 1, train > 0."""
    try:
        parts = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 or math.isnan(p) for p in parts) or parts[0] <= 0:
        raise DataError(f"--split {text!r}: expected three fractions train,val,test, e.g. --split 0.8,0.1,0.1")
    if abs(sum(parts) - 1.0) > 1e-6:
        raise DataError(f"--split {text!r}: the fractions sum to {sum(parts):g}; they must sum to 1")
    return parts[0], parts[1], parts[2]


def unit_hash(seed: int, sha1: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, content hash)."""
    digest = hashlib.sha1(f"{seed}:{sha1}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers summing to `total`, proportional to `weights` (ties go to the earlier split)."""
    wsum = sum(weights)
    if total <= 0 or wsum <= 0:
        return [0] * len(weights)
    raw = [total * w / wsum for w in weights]
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def quotas(n: int, fractions: Sequence[float]) -> list[int]:
    """Target image counts per split for a class of `n` images; every split it is entitled to gets at least one."""
    q = _largest_remainder(n, fractions)
    required = [f > 0 and n * f >= MIN_EXPECTED for f in fractions]
    for i, need in enumerate(required):
        if need and q[i] == 0:
            donor = max(range(len(q)), key=lambda j: (q[j] - (1 if required[j] else 0), -j))
            if q[donor] - (1 if required[donor] else 0) > 0:
                q[donor] -= 1
                q[i] += 1
    return q


def assign_splits(
    items: Sequence[tuple[str, str]],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    previous: Mapping[str, str] | None = None,
) -> list[str]:
    """Split name for each ``(sha1, class)`` (sha1 unique); stratified per class, deterministic, stable.

    Per class: images found in `previous` keep their split. The others fill what each split still lacks of its
    quota (`quotas` over the whole class), taking them in the order of ``unit_hash(seed, sha1)``: the lowest hashes
    go to train, then val, then test. So a class of 100 gives exactly 80/10/10, duplicates (same sha1) share a
    split, and a re-run with `previous` never moves an old image. Without `previous`, added images can only move
    old ones that sit at a quota boundary in hash order.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS):
        raise DataError(f"need {len(SPLITS)} split fractions (train, val, test), got {list(fractions)}")
    previous = previous or {}
    result: list[str] = [""] * len(items)
    by_class: dict[str, list[int]] = {}
    for i, (_, cls) in enumerate(items):
        by_class.setdefault(cls, []).append(i)
    for members in by_class.values():
        target = quotas(len(members), fractions)
        fixed = [0] * len(SPLITS)
        free: list[int] = []
        for i in members:
            old = previous.get(items[i][0])
            if old in SPLITS:
                result[i] = old
                fixed[SPLITS.index(old)] += 1
            else:
                free.append(i)
        deficit = [max(0, t - f) for t, f in zip(target, fixed, strict=True)]
        if sum(deficit) != len(free):  # old images overfill a split: share the free ones by what is lacking
            deficit = _largest_remainder(len(free), deficit if sum(deficit) else fractions)
        free.sort(key=lambda i: (unit_hash(seed, items[i][0]), items[i][0]))
        pos = 0
        for name, k in zip(SPLITS, deficit, strict=True):
            for i in free[pos : pos + k]:
                result[i] = name
            pos += k
    return result
