"""gcp-storage-emulator, plus the preconditions real Google Cloud Storage has on uploads: ``ifGenerationMatch``
(0: the object must not exist; N: its live generation must be N; else 412 Precondition Failed).

The emulator ignores them (checked: a second upload with ``if_generation_match=0`` succeeds), which would leave the
gs:// lock's conditional writes (`raydefect.scoring.sources.GcsConditionalObjects`) untested. Only the check is added
here, atomic with the upload under one lock; uploads, storage and everything else are the emulator's own. Used by the
``gcs_server`` fixture, with the emulator's own arguments: ``python tests/gcs_emulator.py start --port N ...``.
"""

from __future__ import annotations

import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_uploads = threading.Lock()
_insert = objects.insert


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    meta = request.data.get("meta") if isinstance(request.data, dict) else None  # a multipart upload's metadata
    return meta.get("name") if isinstance(meta, dict) else None


def insert(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    if not wanted:
        return _insert(request, response, storage, *args, **kwargs)
    with _uploads:
        try:
            live = str(storage.get_file_obj(request.params["bucket_name"], _object_name(request))["generation"])
        except NotFound:
            live = "0"
        if live != wanted[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            message = "At least one of the pre-conditions you specified did not hold."
            response.json({"error": {"code": 412, "message": message}})
            return None
        return _insert(request, response, storage, *args, **kwargs)


objects.insert = insert  # before the server module builds its routing table from `objects`

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main()
