"""What really went wrong inside Ray's wrappers.

An error raised in a Ray task, actor or Train worker reaches the driver wrapped (RayTaskError, UserCodeException,
Ray Train's WorkerGroupError with `worker_failures`, ...). Commands must still print the user's one-line error
(a `RaydefectError` raised on a worker, or a full disk) instead of Ray's traceback.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

from raydefect import errors
from raydefect.errors import OutputError, RaydefectError

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DISK_TEXTS = ("no space left on device", "disk quota exceeded", "read-only file system")


def find_cause(exc: BaseException, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in `exc`'s chain (causes, contexts, Ray's wrapped causes and worker failures) that
    `wanted` accepts, breadth first."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if wanted(e):
            return e
        todo += [f for f in getattr(e, "worker_failures", {}).values() if isinstance(f, BaseException)]
        for attr in ("cause", "__cause__", "__context__", "controller_failure"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
    return None


_REMOTE = re.compile(r"raydefect\.errors\.(\w+): (.+)")


def user_error(exc: BaseException) -> RaydefectError | None:
    """A `RaydefectError` raised anywhere in the chain (e.g. on a worker), else None.

    Ray Data wraps a task's exception in UserCodeException, and only the remote traceback's text crosses to the
    driver: then the error is rebuilt from its last ``raydefect.errors.XError: message`` line."""
    found = find_cause(exc, lambda e: isinstance(e, RaydefectError))
    if isinstance(found, RaydefectError):
        return found
    for e in (exc, getattr(exc, "cause", None)):
        matches = _REMOTE.findall(str(e)) if e is not None else []
        if matches:
            name, message = matches[-1]
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, RaydefectError):
                try:
                    return cls(message.strip())
                except TypeError:  # a subclass with structured arguments (ImageError): keep the text
                    return RaydefectError(message.strip())
    return None


def _is_disk_error(e: BaseException) -> bool:
    if not isinstance(e, OSError):
        return False
    return e.errno in _DISK_ERRNOS or any(t in str(e).lower() for t in _DISK_TEXTS)


def disk_error(exc: BaseException, where: str, then: str) -> OutputError | None:
    """An `OutputError` when the chain holds a full disk / quota / read-only file system error, else None."""
    found = find_cause(exc, _is_disk_error)
    if found is None:
        return None
    detail = " ".join(str(found).split())[:300]
    return OutputError(f"cannot write {where}: {detail}; free space (or fix permissions) and {then}")
