"""gcp-storage-emulator, plus the preconditions real Google Cloud Storage has on uploads and deletes:
``ifGenerationMatch`` (0: the object must not exist; N: its live generation must be N; else 412 Precondition Failed;
a delete of a missing object is 404).

The emulator ignores them (checked: a second upload with ``if_generation_match=0`` succeeds), which would leave the
gs:// lock's conditional writes (`raydefect.scoring.lock.GcsConditionalObjects`) untested. Only the check is
added here, atomic with the upload or delete under one lock; uploads, deletes, storage and everything else are the
emulator's own. Used by the ``gcs_server`` fixture, with the emulator's own arguments: ``python tests/gcs_emulator.py
start --port N ...``.
"""

from __future__ import annotations

import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_writes = threading.Lock()


def _uploaded_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    meta = request.data.get("meta") if isinstance(request.data, dict) else None  # a multipart upload's metadata
    return meta.get("name") if isinstance(meta, dict) else None


def _with_precondition(handler, name_of, deleting: bool):
    """`handler` (the emulator's), run only if the request's ifGenerationMatch holds for the object it names."""

    def checked(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if not wanted:
            return handler(request, response, storage, *args, **kwargs)
        with _writes:
            try:
                live = str(storage.get_file_obj(request.params["bucket_name"], name_of(request))["generation"])
            except NotFound:
                live = "0"
            if live != wanted[0]:
                missing = deleting and live == "0"
                response.status = HTTPStatus.NOT_FOUND if missing else HTTPStatus.PRECONDITION_FAILED
                message = "No such object." if missing else "At least one of the pre-conditions did not hold."
                response.json({"error": {"code": int(response.status), "message": message}})
                return None
            return handler(request, response, storage, *args, **kwargs)

    return checked


# before the server module builds its routing table from `objects`
objects.insert = _with_precondition(objects.insert, _uploaded_name, deleting=False)
objects.delete = _with_precondition(objects.delete, lambda request: request.params["object_id"], deleting=True)

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main()
