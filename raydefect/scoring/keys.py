"""Incremental keys: which images a model has already scored.

A key identifies one version of one input file for one model: ``(model_id, path, size, mtime)`` with
``score.incremental_key=stat`` (free: listings return size and mtime) or ``(model_id, path, sha1)`` with ``hash``
(content: the bytes must be read). Keys are kept as 128-bit BLAKE2b digests in a sorted numpy array, 16 bytes per
scored image, so the set of a hundred million committed images fits in 1.6 GB and a lookup is a vectorised binary
search. The same digests are computed by the writers (from the rows they write) and by the loader (from committed
files), so a run can test "already committed?" and "already written by this run?" the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from raydefect.errors import error_text

KEY_MODES = ("stat", "hash")
DIGEST = np.dtype([("hi", "<u8"), ("lo", "<u8")])

#: The start of the `error` of a row whose file could not be read for the storage's sake (a network error, a
#: timeout, throttling), not the file's: such rows are not keys (`ScoreStore.load_keys` leaves them out), so the next
#: run scores the image again by itself. Seen: a 110 s object-store outage left an image with a "cannot read ...
#: Timeout" row that every later nightly run counted as scored.
RETRY_PREFIX = "storage error, scored again by the next run: "

#: Read failures that are the file's own (gone, not allowed, not a file): recorded for good, like a corrupt image.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def read_error(e: BaseException) -> str:
    """The `error` of a row whose bytes could not be read: `RETRY_PREFIX` for an I/O error of the storage itself."""
    text = f"{type(e).__name__}: {error_text(e)}"
    if isinstance(e, OSError) and not isinstance(e, _FILE_ERRORS):
        return RETRY_PREFIX + text
    return f"cannot read: {text}"


def _norm_int(value: object) -> int:
    return -1 if value is None else int(value)  # type: ignore[call-overload]


def key_digests(
    model_id: str,
    paths: Sequence[str],
    sizes: Sequence[int | None],
    mtimes_ns: Sequence[int | None],
    sha1s: Sequence[str | None],
    mode: str,
) -> np.ndarray:
    """Digests (dtype `DIGEST`) of each row's key; missing size/mtime/sha1 (unreadable files) hash as -1 / ""."""
    if mode not in KEY_MODES:
        raise ValueError(f"key mode must be one of {KEY_MODES}, got {mode!r}")
    n = len(paths)
    out = np.empty(n, DIGEST)
    raw = bytearray(16 * n)
    prefix = f"{mode}\x00{model_id}\x00".encode()
    for i in range(n):
        if mode == "stat":
            tail = f"{_norm_int(sizes[i])}\x00{_norm_int(mtimes_ns[i])}"
        else:
            tail = sha1s[i] or ""
        h = hashlib.blake2b(
            prefix + paths[i].encode("utf-8", "surrogateescape") + b"\x00" + tail.encode(), digest_size=16
        )
        raw[16 * i : 16 * i + 16] = h.digest()
    if n:
        words = np.frombuffer(bytes(raw), dtype="<u8").reshape(n, 2)
        out["hi"], out["lo"] = words[:, 0], words[:, 1]
    return out


def digests_from_bytes(data: bytes) -> np.ndarray:
    if len(data) % DIGEST.itemsize:
        raise ValueError(f"digest bytes must be a multiple of {DIGEST.itemsize}, got {len(data)}")
    return np.frombuffer(data, dtype=DIGEST).copy()


class KeySet:
    """A set of key digests: a sorted, de-duplicated array; `contains` is a vectorised binary search."""

    def __init__(self, digests: np.ndarray | None = None) -> None:
        self._sorted = np.unique(np.asarray(digests, DIGEST)) if digests is not None else np.empty(0, DIGEST)

    @classmethod
    def union(cls, parts: Iterable[np.ndarray]) -> KeySet:
        parts = [np.asarray(p, DIGEST) for p in parts]
        return cls(np.concatenate(parts) if parts else None)

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def array(self) -> np.ndarray:
        """The sorted digests (read-only view), e.g. to `ray.put` once for every filter task."""
        view = self._sorted.view()
        view.setflags(write=False)
        return view

    def contains(self, digests: np.ndarray) -> np.ndarray:
        return contains(self._sorted, digests)

    def add(self, digests: np.ndarray) -> None:
        if len(digests):
            self._sorted = np.unique(np.concatenate([self._sorted, np.asarray(digests, DIGEST)]))


def contains(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """bool mask: which `digests` are in `sorted_digests` (sorted, unique, dtype `DIGEST`)."""
    digests = np.asarray(digests, DIGEST)
    if len(sorted_digests) == 0 or len(digests) == 0:
        return np.zeros(len(digests), bool)
    idx = np.searchsorted(sorted_digests, digests)
    idx = np.minimum(idx, len(sorted_digests) - 1)
    return sorted_digests[idx] == digests


def first_occurrence(digests: np.ndarray) -> np.ndarray:
    """bool mask keeping the first row of each distinct digest (de-duplicates one batch)."""
    digests = np.asarray(digests, DIGEST)
    keep = np.zeros(len(digests), bool)
    if len(digests):
        _, first = np.unique(digests, return_index=True)
        keep[first] = True
    return keep
