"""A Cloud Storage emulator on loopback, for the tests and benchmarks of gs:// paths (no mocks).

    python tools/gcs_emulator.py [--port PORT] [--host 127.0.0.1] [--verbose] [--without FIX ...]

Runs `gcp-storage-emulator` (PyPI) in memory, in the foreground, until SIGTERM or Ctrl-C, and
prints one line `gcs-emulator listening on http://HOST:PORT` once it accepts requests (with
`--port 0`, the default, on a free port the kernel picks). Point the clients at it with the
variables `client_env(url)` returns (docs/storage.md says why each is needed):

    STORAGE_EMULATOR_HOST=URL               gcsfs (so etils.epath, so storage.path) and google-cloud-storage
    TENSORSTORE_GCS_HTTP_URL=URL            tensorstore, orbax's array writer
    GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator  tensorstore: a fixed bearer token instead of a credentials search
    FSSPEC_GCS_TOKEN=anon                   gcsfs: no credentials search, no token
    FSSPEC_GCS_USE_LISTINGS_CACHE=false     gcsfs: list the server each time (other writers: tensorstore, subprocesses)
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false gcsfs: no Storage Control (gRPC) bucket-type lookup the emulator lacks

The emulator needs a few fixes to serve these clients (`FIXES`); `serve` applies them at start-up
by patching the emulator's server and handlers, each with a comment saying which client request
fails or stalls without it and why; `--without NAME` leaves one out, to see what it is for.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import urllib.parse
from functools import partial
from http import HTTPStatus, server

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator import storage as emulator_storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def client_env(url: str) -> dict[str, str]:
    """The environment variables that point gcsfs, google-cloud-storage and tensorstore at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def create_bucket(url: str, prefix: str = "test") -> str:
    """Creates a new empty bucket on the emulator at `url`; returns "gs://<name>"."""
    import json
    import urllib.request
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project={prefix}",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if json.load(response)["name"] != name:
            raise RuntimeError(f"the emulator did not create bucket {name}")
    return f"gs://{name}"


# -- Fix 1: a server that takes concurrent connections ------------------------------------------
# The emulator serves with `http.server.HTTPServer`: one request at a time, a listen backlog of
# 5, a new TCP connection per request (HTTP/1.0). tensorstore (orbax's array writer) opens up to
# 32 concurrent connections per write; the SYNs past the backlog are dropped and retried by the
# kernel after 1 s, 3 s, ..., so a checkpoint of a few hundred chunks took tens of seconds. A
# threading server with a long backlog accepts them all; one lock serialises the handlers, as
# the emulator's storage is not thread-safe.


class ThreadingServer(server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


_HANDLER_LOCK = threading.Lock()


class RequestHandler(emulator_server.RequestHandler):
    def handle(self):
        # gcsfs's `info` asks for the object and for a listing of its name as a folder at once
        # and drops the connection of the answer it no longer needs: not an error of either side.
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _handle(self, method: str) -> None:
        with _HANDLER_LOCK:
            emulator_server.Router(self).handle(method)

    def do_GET(self):
        self._handle(emulator_server.GET)

    def do_POST(self):
        self._handle(emulator_server.POST)

    def do_PUT(self):
        self._handle(emulator_server.PUT)

    def do_DELETE(self):
        self._handle(emulator_server.DELETE)

    def do_PATCH(self):
        self._handle(emulator_server.PATCH)


# -- Fix 2: objects.move (gcsfs `mv`, so `epath.Path.rename`) -----------------------------------
# gcsfs moves an object with `POST /storage/v1/b/B/o/SRC/moveTo/o/DST` (the JSON API's
# objects.move). The emulator has no such route and answers 501, which gcsfs retries with
# back-off for about 30 s before it falls back to copy + delete. Served here as copy + delete.


def _move(request, response, storage):
    bucket = request.params["bucket_name"]
    source, destination = request.params["object_id"], request.params["dest_object_id"]
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, destination)
        storage.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


def _add_move_route() -> None:
    bucket, obj = r"(?P<bucket_name>[-.\w]+)", r"(?P<object_id>.*[^/]+)"
    route = (
        rf"^/storage/v1/b/{bucket}/o/{obj}/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
        {emulator_server.POST: _move},
    )
    # Before the generic `.../o/OBJECT` route, which would take `SRC/moveTo/o/DST` as one name.
    emulator_server.HANDLERS = (route, *emulator_server.HANDLERS)


# -- Fix 3: generation preconditions (tensorstore's and orbax's atomic writes) ------------------
# tensorstore writes with `ifGenerationMatch` (0: only if the object does not exist; N: only if
# it is still generation N): OCDBT's manifest and every "create" rely on it to detect a
# concurrent writer. The emulator ignores the parameter and overwrites, so a test could never see
# a lost update that real Cloud Storage refuses with 412. Checked here on uploads and reads
# (`ifGenerationNotMatch` on a read answers 304, as the real service does).


def _generation(storage, bucket: str, name: str | None) -> int:
    """The live generation of `bucket/name`, 0 when there is none (the API's convention)."""
    if not name:
        return 0
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _precondition_failed(response) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    message = "At least one of the pre-conditions you specified did not hold."
    response.json({"error": {"code": 412, "message": message, "errors": [{"reason": "conditionNotMet"}]}})


def _upload_name(request) -> str | None:
    """The object an upload names: `?name=`, else the metadata of a multipart or resumable upload."""
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return data.get("name") or (data.get("meta") or {}).get("name")
    return None


def _checked_upload(handler):
    def checked(request, response, storage, *args, **kwargs):
        query = request.query
        if "ifGenerationMatch" in query and "upload_id" not in query:
            wanted = int(query["ifGenerationMatch"][0])
            if _generation(storage, request.params["bucket_name"], _upload_name(request)) != wanted:
                return _precondition_failed(response)
        return handler(request, response, storage, *args, **kwargs)

    return checked


def _checked_read(handler):
    def checked(request, response, storage, *args, **kwargs):
        query = request.query
        current = _generation(storage, request.params["bucket_name"], request.params.get("object_id"))
        if current and "ifGenerationMatch" in query and int(query["ifGenerationMatch"][0]) != current:
            return _precondition_failed(response)
        if current and "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"][0]) == current:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        return handler(request, response, storage, *args, **kwargs)

    return checked


def _add_preconditions() -> None:
    wrapped = {objects.insert: _checked_upload(objects.insert)}
    for reader in (objects.get, objects.download):
        wrapped[reader] = _checked_read(reader)
    emulator_server.HANDLERS = tuple(
        (regex, {method: wrapped.get(handler, handler) for method, handler in methods.items()})
        for regex, methods in emulator_server.HANDLERS
    )
    # The router's own fallback for uploads POSTed without the /upload prefix.
    emulator_server.objects = _RouterObjects(wrapped[objects.insert])


class _RouterObjects:
    """`objects` as the router sees it, with `insert` checked (the rest unchanged)."""

    def __init__(self, insert):
        self.insert = insert

    def __getattr__(self, name):
        return getattr(objects, name)


# -- Fix 4: no metadata file rewritten on every request -----------------------------------------
# After every upload or delete the emulator serialises the metadata of every object it holds to
# a `.meta` JSON file, even in memory where nothing reads it back: each request costs time in
# proportion to everything stored so far (a test session writes thousands of objects). Memory
# storage skips it here; the in-process dictionaries are the state.


def _skip_meta_in_memory() -> None:
    write = emulator_storage.Storage._write_config_to_file

    def write_config(self):
        if not self._use_memory_fs:
            write(self)

    emulator_storage.Storage._write_config_to_file = write_config


FIXES = {"threads": None, "move": _add_move_route, "preconditions": _add_preconditions, "meta": _skip_meta_in_memory}


def serve(host: str, port: int, without: tuple[str, ...] = ()) -> server.HTTPServer:
    """A bound (not yet serving) emulator in memory, with every fix but those in `without`;
    `serve_forever()` runs it."""
    for name, apply in FIXES.items():
        if apply is not None and name not in without:
            apply()
    storage = emulator_storage.Storage(use_memory_fs=True)
    if "threads" in without:
        return server.HTTPServer((host, port), partial(emulator_server.RequestHandler, storage))
    return ThreadingServer((host, port), partial(RequestHandler, storage))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument(
        "--without", action="append", default=[], choices=sorted(FIXES), help="leave a fix out (to see what it is for)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL, stream=sys.stderr)
    httpd = serve(args.host, args.port, tuple(args.without))
    host, port = httpd.server_address[:2]
    url = urllib.parse.urlunsplit(("http", f"{host}:{port}", "", "", ""))

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"gcs-emulator listening on {url}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
