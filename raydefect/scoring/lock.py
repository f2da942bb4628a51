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
from typing import Any, Protocol

from raydefect import console
from raydefect.errors import OutputError, first_line
from raydefect.paths import split_scheme
from raydefect.scoring import storage as object_storage
from raydefect.scoring.records import json_bytes, json_or_none, utc_now
from raydefect.scoring.storage import Storage, gcs_client, gcs_emulator, s3_endpoint

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


class ConditionalObjects(Protocol):
    """Create-if-absent and compare-and-swap on single objects of one bucket. pyarrow's filesystems have neither, and
    a lock needs one: two runs that both read "no lock" and both write one would each believe they hold it."""

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and version; None if there is none."""
        ...

    def put(self, key: str, body: bytes, version: str | None) -> str | None:
        """Write `body` only if the object is absent (`version` None) or still at `version`: its new version, or None
        when it was not (another writer got there first, or it was deleted)."""
        ...

    def delete(self, key: str, version: str) -> bool:
        """Delete the object only if it is still at `version`: False when it was not (replaced, or already gone)."""
        ...


class S3ConditionalObjects:
    """`ConditionalObjects` on S3: PutObject with ``If-None-Match: *`` or ``If-Match: <ETag>`` (AWS S3 since 2024,
    MinIO; boto3, the ``s3`` extra). The version is the ETag."""

    def __init__(self, client: object, bucket: str) -> None:
        self.client, self.bucket = client, bucket

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=key)  # type: ignore[attr-defined]
            return got["Body"].read(), got["ETag"]
        except Exception as e:
            if _s3_status(e) == 404:
                return None
            raise OSError(f"cannot read s3://{self.bucket}/{key}: {first_line(e)}") from None

    def put(self, key: str, body: bytes, version: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)["ETag"]  # type: ignore[attr-defined]
        except Exception as e:
            if _s3_status(e) in (404, 409, 412):  # absent for If-Match; a concurrent conditional write; not met
                return None
            raise OSError(f"cannot write s3://{self.bucket}/{key}: {first_line(e)}") from None

    def delete(self, key: str, version: str) -> bool:
        # AWS S3 since 2025-09 (412 if replaced, 404 if absent). A store that ignores If-Match deletes as before it; one
        # that refuses it (400, 501) gets the plain delete the caller's read has just justified, as before it too
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=version)  # type: ignore[attr-defined]
        except Exception as e:
            status = _s3_status(e)
            if status in (404, 412):
                return False
            if status not in (400, 501):
                raise OSError(f"cannot delete s3://{self.bucket}/{key}: {first_line(e)}") from None
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)  # type: ignore[attr-defined]
            except Exception as e2:
                raise OSError(f"cannot delete s3://{self.bucket}/{key}: {first_line(e2)}") from None
        return True


def _s3_status(e: Exception) -> int | None:
    response = getattr(e, "response", None)  # botocore's ClientError
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


#: What `conditional_objects` needs on each object store: the fix named when a lock cannot be atomic.
CONDITIONAL_WRITES_NEED = {
    "s3": "boto3 >= 1.36 (pip install 'raydefect[s3]')",
    "gs": "google-cloud-storage and credentials it finds (pip install 'raydefect[gcs]')",
}


def conditional_objects(location: str, storage: Storage) -> ConditionalObjects | None:
    """`ConditionalObjects` for an object-store location's bucket: on s3:// with boto3 (the endpoint, region and retry
    bound its pyarrow filesystem has), on gs:// with google-cloud-storage; None on other stores, or without them."""
    scheme, path = split_scheme(location)
    if scheme == "gs":
        client = gcs_client(gcs_emulator())
        return None if client is None else GcsConditionalObjects(client, path.split("/", 1)[0])
    if scheme != "s3":
        return None
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    fs, _ = storage.resolve(location)
    config = Config(
        retries={"max_attempts": object_storage.S3_ATTEMPTS, "mode": "standard"}, connect_timeout=5, read_timeout=30
    )
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint(storage.endpoint_override),
        region_name=getattr(fs, "region", None) or None,
        config=config,
    )
    members = client.meta.service_model.operation_model("PutObject").input_shape.members
    if not {"IfMatch", "IfNoneMatch"} <= set(members):  # botocore before late 2024: no conditional writes
        return None
    return S3ConditionalObjects(client, path.split("/", 1)[0])


class GcsConditionalObjects:
    """`ConditionalObjects` on Google Cloud Storage: uploads with ``ifGenerationMatch`` (0: the object must not exist;
    N: it must still be generation N), google-cloud-storage (the ``gcs`` extra). The version is the generation."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.bucket = client.bucket(bucket)

    @staticmethod
    def _calls() -> dict[str, Any]:
        from google.api_core.retry import Retry

        # conditional calls are idempotent, so they are retried (bounded); a retry after a lost answer finds the
        # condition unmet, which `ScoreStore` recognises by the run's own id in the object
        return {"timeout": 60, "retry": Retry(timeout=object_storage.GCS_RETRY_S)}

    def read(self, key: str) -> tuple[bytes, str] | None:
        for _ in range(3):  # the object replaced between its metadata and its bytes: read the new one
            try:
                blob = self.bucket.get_blob(key, **self._calls())
                if blob is None:
                    return None
                generation = blob.generation  # before the download, which resets it from a response header
                return blob.download_as_bytes(if_generation_match=generation, **self._calls()), str(generation)
            except Exception as e:
                if getattr(e, "code", None) not in (404, 412):
                    raise OSError(f"cannot read gs://{self.bucket.name}/{key}: {first_line(e)}") from None
        raise OSError(f"cannot read gs://{self.bucket.name}/{key}: it changed on every read; try again")

    def put(self, key: str, body: bytes, version: str | None) -> str | None:
        blob = self.bucket.blob(key)
        try:
            match = 0 if version is None else int(version)
            blob.upload_from_string(body, content_type="application/json", if_generation_match=match, **self._calls())
        except Exception as e:  # google.api_core's PreconditionFailed (412); NotFound; Conflict (concurrent writes)
            if getattr(e, "code", None) in (404, 409, 412):
                return None
            raise OSError(f"cannot write gs://{self.bucket.name}/{key}: {first_line(e)}") from None
        return str(blob.generation)

    def delete(self, key: str, version: str) -> bool:
        try:
            self.bucket.blob(key).delete(if_generation_match=int(version), **self._calls())
        except Exception as e:
            if getattr(e, "code", None) in (404, 412):
                return False
            raise OSError(f"cannot delete gs://{self.bucket.name}/{key}: {first_line(e)}") from None
        return True


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
