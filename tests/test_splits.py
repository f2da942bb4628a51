"""Splits: exact per-class quotas, determinism, order independence, stability with a previous manifest."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raydefect.data.splits import SPLITS, assign_splits, parse_split, quotas
from raydefect.errors import DataError


def _items(n: int, cls: str = "a", start: int = 0) -> list[tuple[str, str]]:
    return [(hashlib.sha1(f"{cls}{i}".encode()).hexdigest(), cls) for i in range(start, start + n)]


def test_parse_split():
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    assert parse_split("0.9,0.1,0") == (0.9, 0.1, 0.0)
    for bad in ("0.8,0.2", "a,b,c", "0,0.5,0.5", "0.8,0.3,-0.1"):
        with pytest.raises(DataError, match="three fractions"):
            parse_split(bad)
    with pytest.raises(DataError, match="sum to 1.1"):
        parse_split("0.8,0.2,0.1")


@pytest.mark.parametrize(
    ("n", "expected"),
    [(100, [80, 10, 10]), (8, [6, 1, 1]), (5, [3, 1, 1]), (4, [3, 1, 0]), (1, [1, 0, 0]), (115, [92, 12, 11])],
)
def test_quotas(n, expected):
    assert quotas(n, (0.8, 0.1, 0.1)) == expected


def test_quotas_respect_a_zero_fraction():
    assert quotas(50, (0.9, 0.1, 0.0)) == [45, 5, 0]


def test_assignment_is_stratified_deterministic_and_independent_of_order():
    items = _items(57, "crack") + _items(32, "fray") + _items(300, "normal")
    result = dict(zip(items, assign_splits(items, seed=3), strict=True))
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert dict(zip(shuffled, assign_splits(shuffled, seed=3), strict=True)) == result
    for cls, n in (("crack", 57), ("fray", 32), ("normal", 300)):
        got = Counter(result[i] for i in items if i[1] == cls)
        assert [got[s] for s in SPLITS] == quotas(n, (0.8, 0.1, 0.1))
    other = dict(zip(items, assign_splits(items, seed=4), strict=True))
    assert other != result


def test_previous_assignments_are_kept_and_new_images_fill_what_is_lacking():
    old = _items(20)
    first = assign_splits(old)
    previous = {sha: split for (sha, _), split in zip(old, first, strict=True)}
    grown = old + _items(80, start=20)
    second = assign_splits(grown, previous=previous)
    assert second[:20] == first
    assert Counter(second) == {"train": 80, "val": 10, "test": 10}


def test_an_overfilled_split_in_the_previous_manifest_is_tolerated():
    old = _items(10)
    previous = {sha: "test" for sha, _ in old}  # e.g. an earlier run with --split 0.1,0.1,0.8
    result = assign_splits(old + _items(10, start=10), previous=previous)
    assert result[:10] == ["test"] * 10
    assert Counter(result[10:]) == {"train": 9, "val": 1}  # new images go where they are lacking


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    added=st.lists(st.integers(0, 30), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_properties_of_growing_classes(sizes, added, seed):
    items = [it for k, n in enumerate(sizes) for it in _items(n, f"c{k}")]
    first = assign_splits(items, seed=seed)
    for k, n in enumerate(sizes):
        got = Counter(s for (_, c), s in zip(items, first, strict=True) if c == f"c{k}")
        assert [got[s] for s in SPLITS] == quotas(n, (0.8, 0.1, 0.1))
        if n >= 5:
            assert got["val"] >= 1 and got["test"] >= 1
    previous = {sha: s for (sha, _), s in zip(items, first, strict=True)}
    more = items + [it for k, n in enumerate(sizes) for it in _items(added[k], f"c{k}", start=n)]
    second = assign_splits(more, seed=seed, previous=previous)
    assert second[: len(items)] == first
