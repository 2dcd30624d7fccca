"""A local GCS for the tests: the PyPI `gcp-storage-emulator`, with the two parts of the
GCS JSON API that it leaves out and that tensorstore's OCDBT checkpoints rely on.

Real GCS answers a media download with the object's generation in `x-goog-generation`
and honours the preconditions `ifGenerationMatch` (412 when the object's generation
differs; 0 means "must not exist") and `ifGenerationNotMatch` (304 when it is the same);
orbax's OCDBT manifest is updated with them.  The emulator sends no generation header and
ignores both, so tensorstore stops with "Malformed StorageGeneration".  This script adds
them, then runs the emulator:

    python tests/gcs_emulator.py PORT BUCKET
"""

from __future__ import annotations

import sys
from http import HTTPStatus

BUCKET = "bnfree-test"  # the tests' bucket


def _patch() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current_generation(request, storage, object_id):
        try:
            return str(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
        except NotFound:
            return "0"  # GCS: generation 0 stands for "no live object"

    def precondition_fails(request, response, generation) -> bool:
        match = request.query.get("ifGenerationMatch")
        if match and match[0] != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "conditionNotMet"}})
            return True
        return False

    download, insert = objects.download, objects.insert

    def download_with_generation(request, response, storage, *args, **kwargs):
        generation = current_generation(request, storage, request.params["object_id"])
        not_match = request.query.get("ifGenerationNotMatch")
        if generation != "0":
            if not_match and not_match[0] == generation:
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = generation
                return None
            if precondition_fails(request, response, generation):
                return None
            response["x-goog-generation"] = generation
        return download(request, response, storage, *args, **kwargs)

    def insert_with_preconditions(request, response, storage, *args, **kwargs):
        name = request.query.get("name")
        if name and precondition_fails(request, response, current_generation(request, storage, name[0])):
            return None
        return insert(request, response, storage, *args, **kwargs)

    swap = {download: download_with_generation, insert: insert_with_preconditions}
    objects.download, objects.insert = download_with_generation, insert_with_preconditions
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in swap:
                handlers[method] = swap[fn]


def main(port: str, bucket: str) -> None:
    _patch()
    from gcp_storage_emulator.__main__ import main as emulator_main

    emulator_main(["start", "--host", "127.0.0.1", "--port", port, "--in-memory",
                   "--default-bucket", bucket, "--quiet"])


if __name__ == "__main__":
    main(*sys.argv[1:3])
