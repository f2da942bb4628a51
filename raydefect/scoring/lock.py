"""One run per scores folder (`StoreLock`, part of `ScoreStore`): locally an ``fcntl.flock`` on ``OUT/.lock``; on
object stores a lock object with a heartbeat, taken with conditional writes where the store has them (see
`raydefect.scoring.store` for the whole protocol)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raydefect import console
from raydefect.errors import OutputError
from raydefect.paths import split_scheme
from raydefect.scoring.records import json_bytes, json_or_none, utc_now
from raydefect.scoring.sources import CONDITIONAL_WRITES_NEED, conditional_objects

LOCK_FILE = ".lock"
REMOTE_LOCK = "_lock.json"
REMOTE_LOCK_LEASE_S = 5 * 60  # a lock object whose heartbeat is older is free (its run died without releasing it)
REMOTE_LOCK_BEAT_S = 30.0  # a thread renews the heartbeat this often while the lock is held


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether a lock holder ran on this host and its process is gone (SIGKILL, OOM: it never released the lock)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        pid = int(holder.get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False  # alive under another user, or no usable pid: let the lease decide
    return False


class StoreLock:
    """The lock half of `ScoreStore` (a mixin: it uses the store's ``fs``, ``out``, paths and JSON helpers)."""

    @contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        """Exclusive use of ``OUT`` for one run (see the module docstring for object stores)."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now(), "run_id": run_id}
        if self.remote:
            self._remote_lock(holder)
            stop = threading.Event()
            beat = threading.Thread(
                target=self._beat, args=(holder, stop), daemon=True, name="raydefect-lock-heartbeat"
            )
            beat.start()
            try:
                yield
            finally:
                stop.set()
                beat.join(timeout=5)
                self._remote_unlock(run_id)
                self._holder = None
            return
        import fcntl

        path = self.path(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(self._busy_message(self._read_json(path))) from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {e}; put --out on a file system that supports locks") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        who = "another run"
        if holder:
            who = (
                f"run {holder.get('run_id')} (pid {holder.get('pid')} on host {holder.get('host')}, "
                f"started {holder.get('started_at')})"
            )
        return f"--out {self.out} is locked by {who}; wait for it to finish, or write to another --out"

    def _remote_lock(self, holder: dict[str, Any]) -> None:
        path = self.path(REMOTE_LOCK)
        self._cond = conditional_objects(self.out, self.storage)
        version: str | None = None  # the lock object's version as read, for a conditional takeover
        if self._cond is not None:
            current, version = self._lock_object()
        else:
            need = CONDITIONAL_WRITES_NEED.get(split_scheme(self.out)[0], "conditional writes")
            console.warn(
                f"the lock on {self.out} is not atomic without {need}: two runs started in the same second could "
                "both run; install it, or start runs from one scheduler"
            )
            current = self._read_json(path)
        if current:
            age = time.time() - float(current.get("heartbeat", 0))
            if _dead_here(current):
                console.warn(
                    f"taking over the lock of run {current.get('run_id')} on {self.out}: its process (pid "
                    f"{current.get('pid')} on this host) is gone"
                )
            elif age < REMOTE_LOCK_LEASE_S:
                lapse = dt.datetime.fromtimestamp(time.time() + REMOTE_LOCK_LEASE_S - age, dt.timezone.utc)
                raise OutputError(
                    self._busy_message(current) + f" (lock object {self.location(REMOTE_LOCK)}, last heartbeat "
                    f"{age:.0f} s ago; if that run died, its lock lapses at {lapse:%H:%M:%S} UTC, "
                    f"{REMOTE_LOCK_LEASE_S // 60} min after its last heartbeat, or delete the lock object)"
                )
        payload = {**holder, "heartbeat": time.time()}
        if self._cond is not None:  # atomic: of two runs that both found the lock free, one write fails here
            self._version = self._conditional_write(payload, version)
            if self._version is None:
                raise OutputError(self._busy_message(self._read_json(path)))
        else:
            self._write_json(path, payload)
        time.sleep(0.2)  # and read back: a store without conditional writes (or one that ignores them)
        mine = self._read_json(path)
        if not mine or mine.get("run_id") != holder["run_id"]:
            raise OutputError(self._busy_message(mine))
        self._holder, self._lost = holder, None

    def _lock_object(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock object as read by the conditional writer: (its holder, its version); (None, None) if absent."""
        assert self._cond is not None
        found = self._cond.read(self._key(REMOTE_LOCK))
        return (json_or_none(found[0]), found[1]) if found else (None, None)

    def _conditional_write(self, payload: dict[str, Any], version: str | None) -> str | None:
        """Write the lock object if it is still at `version` (None: absent); its new version, or None if another run
        holds it. A refused write whose object holds this run's own id is this run's: an earlier attempt went through
        and its answer was lost (a timeout, then the SDK's retry found the condition no longer met)."""
        assert self._cond is not None
        new = self._cond.put(self._key(REMOTE_LOCK), json_bytes(payload), version)
        if new is None:
            current, version = self._lock_object()
            if current and current.get("run_id") == payload["run_id"]:
                return version
        return new

    def _beat(self, holder: dict[str, Any], stop: threading.Event) -> None:
        """Renew the lock object's heartbeat until `stop`, for as long as the lock is held (listing, recovery and
        scoring alike: renewed only at commits, it lapsed under a run scoring its first 5,000 images slowly, and a
        second run took over and deleted the live run's staged files). Stops renewing once another run holds it, or
        once the lock object is gone (deleted by hand to break it: never written back)."""
        while not stop.wait(REMOTE_LOCK_BEAT_S):
            try:
                payload = {**holder, "heartbeat": time.time()}
                if self._cond is not None:  # renewed only if still the version this run wrote
                    self._version = self._conditional_write(payload, self._version)
                    if self._version is None:
                        self._lost = self._read_json(self.path(REMOTE_LOCK)) or {}
                        return
                    continue
                current = self._read_json(self.path(REMOTE_LOCK))
                if not current or current.get("run_id") != holder["run_id"]:
                    self._lost = current or {}
                    return
                self._write_json(self.path(REMOTE_LOCK), payload)
            except OSError as e:  # an object store that does not answer for a while: try again at the next beat
                console.debug(f"lock heartbeat on {self.out} failed: {e}")

    def check_lock(self) -> None:
        """Raise if another run has taken this run's lock object (a lapsed heartbeat): committing now could put an
        image's row in twice. Local locks cannot be lost."""
        if self._holder is None:
            return
        current = self._lost if self._lost is not None else self._read_json(self.path(REMOTE_LOCK))
        if not current or current.get("run_id") != self._holder["run_id"]:
            how = (
                f"the lock object is now held by run {current.get('run_id')} (pid {current.get('pid')} on host "
                f"{current.get('host')})"
                if current
                else "the lock object was deleted"
            )
            raise OutputError(
                f"this run lost its lock on {self.out} ({how}): stopping without committing; the images not committed "
                "are scored by the next run"
            )

    def _remote_unlock(self, run_id: str) -> None:
        """Delete the lock object if this run still holds it. With conditional writes the delete is conditional too,
        on the version read: a lock taken over between that read and the delete (this run's lease lapsed) stays with
        its new holder."""
        if self._cond is None:
            current = self._read_json(self.path(REMOTE_LOCK))
            if current and current.get("run_id") == run_id:
                self.fs.delete_file(self.path(REMOTE_LOCK))
            return
        for _ in range(3):  # refused: replaced since the read (another run, or this run's last heartbeat): look again
            current, version = self._lock_object()
            if not current or current.get("run_id") != run_id or version is None:
                return
            if self._cond.delete(self._key(REMOTE_LOCK), version):
                return
