"""One path type for local files and object stores: every reader and writer opens paths here.

`path(p)` returns an `etils.epath.Path`, the path type orbax already uses for checkpoints: a
local path is a `pathlib`-like path on the local filesystem, as before; `gs://bucket/key` is a
path in Cloud Storage (through fsspec's `gcsfs`). `s3://` is refused with its reason (`NOT_YET`);
any other URL scheme, or a supported one whose backend package is not installed, is refused with
one line (`UnsupportedPath`, a usage error) before anything is read or written: never a local
folder named `gs:`, as `pathlib.Path("gs://b/r")` would make.

Object stores have no rename and no append, so the writers here do not assume either:
- `write_text`/`write_bytes` publish a whole file at once: a local file is written beside its
  name and renamed over it; an object is uploaded in one request, which the store makes visible
  whole or not at all (write-then-publish, never a half-written file under the final name);
- `Appender` keeps an append-only file (metrics.jsonl): locally it appends; on a store it
  re-uploads the whole object after each append (the file is small: one line per logged step);
- `SyncedDir` gives a library that writes with plain `open` (tensorboardX's event files) a local
  folder that is uploaded to the store on `sync()`;
- `local_copy(p)` is a local file or folder for a library that reads only local paths
  (safetensors' memory map, a tokenizer folder), downloaded once per process.

Checkpoints are orbax's: on a store it uses its own commit protocol (a `commit_success` file
per step) instead of renames; `train.checkpoint` only passes the path through.

Local emulators (the tests run one): `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` points
`gcsfs` and `google-cloud-storage` at a Cloud Storage emulator and `TENSORSTORE_GCS_HTTP_URL`
(same address) points tensorstore (orbax's array writer) at it; see docs/storage.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path as LocalPath

from etils import epath

from speechlm_jax import cli

# URL scheme -> the fsspec package that implements it.
SCHEMES: dict[str, str] = {"gs": "gcsfs"}
# Schemes refused for a measured reason, not for want of trying.
NOT_YET: dict[str, str] = {
    "s3": (
        "orbax (0.12.8) cannot checkpoint there: its tensorstore spec builder treats only gs:// as remote "
        "(s3://b/k becomes the local path s3:/b/k) and it finalises a step by renaming a folder, which S3 "
        "cannot do; and s3fs's botocore needs python-dateutil<3. Use gs:// or a mounted shared filesystem"
    )
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

PathLike = str | os.PathLike | epath.Path


class UnsupportedPath(cli.UsageError):
    """A path whose URL scheme cannot be read or written here."""


def scheme(p: PathLike) -> str | None:
    """'gs' for gs://bucket/key, None for a local path."""
    match = _URL.match(os.fspath(p))
    return match.group(1).lower() if match else None


def is_remote(p: PathLike) -> bool:
    """True for a URL (gs://bucket/key; any scheme), False for a local path."""
    return scheme(p) is not None


def path_problem(p: PathLike) -> str | None:
    """Why `p` cannot be opened here (an unsupported URL scheme, a missing backend), else None."""
    text = os.fspath(p)
    kind = scheme(text)
    if kind is None:
        return None
    if kind in NOT_YET:
        return f"{text!r}: {kind}:// paths are not supported: {NOT_YET[kind]}"
    if kind not in SCHEMES:
        supported = ", ".join(f"{s}://" for s in SCHEMES)
        return f"{text!r}: the {kind}:// scheme is not supported (object stores: {supported}; or a local path)"
    package = SCHEMES[kind]
    if importlib.util.find_spec(package) is None:
        return f"{text!r}: {kind}:// paths need the {package} package (pip install {package})"
    if not text[len(kind) + 3 :].strip("/"):
        return f"{text!r} names no bucket"
    return None


@functools.cache
def _configure_fsspec() -> None:
    """gcsfs caches folder listings with no expiry: a process that listed a folder (an evaluator
    polling a workdir, a restart looking for its latest step) would never see what other hosts
    or tensorstore wrote into it since. Listings are read from the store each time instead."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def path(p: PathLike) -> epath.Path:
    """The path `p` names, local or in an object store; `UnsupportedPath` if it cannot be opened."""
    if isinstance(p, epath.Path):
        return p
    if problem := path_problem(p):
        raise UnsupportedPath(problem)
    if is_remote(p):
        _configure_fsspec()
    return epath.Path(os.fspath(p))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, for APIs that take strings (orbax, tensorboardX)."""
    return os.fspath(path(base).joinpath(*parts))


def beside(folder: PathLike, name: str) -> str:
    """A path `name` written in a file of `folder` (a manifest's audio): itself when absolute or a
    URL, else relative to `folder` (which may be in an object store)."""
    if is_remote(name) or os.path.isabs(name):
        return name
    return os.fspath(path(folder) / name)


def write_bytes(p: PathLike, data: bytes) -> None:
    """Publish `data` as the whole of file `p`: readers see the old file or the new one, never half."""
    target = path(p)
    if is_remote(target):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(target))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


class Appender:
    """An append-only text file (one line per record) that works on object stores too.

    Locally each `append` is an `open(..., "a")`. On a store, which has no append, the file's
    existing content is read once and the whole object is uploaded again after each append.
    """

    def __init__(self, p: PathLike):
        self.path = path(p)
        self.remote = is_remote(self.path)
        self._content: str | None = None

    def append(self, text: str) -> None:
        if not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(text)
            return
        if self._content is None:
            self._content = self.path.read_text() if self.path.exists() else ""
        self._content += text
        self.path.write_text(self._content)


class SyncedDir:
    """A local folder for code that only knows local files, mirrored to `target` on `sync()`.

    For a local `target` it is `target` itself and `sync` does nothing. For a store path the
    folder is a temporary one (with `pull=True`, first filled with what `target` holds); `sync`
    uploads every file that changed since the last sync (whole files: an object store replaces an
    object at once) and deletes from the store the files that were removed locally; `close` syncs
    and removes the local folder.
    """

    def __init__(self, target: PathLike, *, pull: bool = False):
        self.target = path(target)
        self.remote = is_remote(self.target)
        self._synced: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = LocalPath(os.fspath(self.target))
            return
        if pull:
            # One local copy per target: what the copy's files record of their own paths stays the same
            # across runs on this machine (a resumed stage finds its inputs where it left them).
            self.local = _cache_root() / "synced" / _slug(os.fspath(self.target))
            shutil.rmtree(self.local, ignore_errors=True)
            self.local.mkdir(parents=True)
        else:
            self.local = LocalPath(tempfile.mkdtemp(prefix="speechlm-sync-"))
        if pull and self.target.is_dir():
            for relative, remote_file in files_under(self.target):
                local_file = self.local / relative
                local_file.parent.mkdir(parents=True, exist_ok=True)
                local_file.write_bytes(remote_file.read_bytes())
                self._synced[relative] = _version(local_file)

    def sync(self) -> None:
        if not self.remote:
            return
        present = set()
        for file in sorted(self.local.rglob("*")):
            if not file.is_file():
                continue
            relative = file.relative_to(self.local).as_posix()
            present.add(relative)
            version = _version(file)
            if self._synced.get(relative) == version:
                continue
            self.target.joinpath(relative).write_bytes(file.read_bytes())
            self._synced[relative] = version
        for relative in sorted(set(self._synced) - present):
            with contextlib.suppress(FileNotFoundError):
                self.target.joinpath(relative).unlink()
            del self._synced[relative]

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def files_under(folder: PathLike) -> Iterator[tuple[str, epath.Path]]:
    """(relative posix path, path) of every file under `folder`, local or in an object store."""
    root = path(folder)
    # epath's fsspec backend walks a bucket with roots that lack the scheme ("bucket/key"), which
    # `epath.Path` would take for a local path: put it back.
    prefix = f"{scheme(root)}://" if is_remote(root) else ""
    base = os.fspath(root).rstrip("/")
    for current, _, files in root.walk():
        text = os.fspath(current)
        if prefix and not text.startswith(prefix):
            text = prefix + text
        for name in sorted(files):
            file = epath.Path(text) / name
            yield posixpath.relpath(os.fspath(file), base), file


def upload(folder: PathLike, target: PathLike, *, last: str | None = None) -> str:
    """Copies every file under the local `folder` to `target` (local or in an object store), the
    file named `last` (at any depth) after all others; returns `target` as a string."""
    source = LocalPath(os.fspath(folder))
    files = sorted(p for p in source.rglob("*") if p.is_file())
    root = path(target)
    for file in sorted(files, key=lambda p: p.name == last):
        destination = root / file.relative_to(source).as_posix()
        if not is_remote(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(file.read_bytes())
    return os.fspath(target)


def _version(file: LocalPath) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def absolute(p: PathLike) -> str:
    """`p` as a string that names the same place from any working directory (settings, records)."""
    return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def _cache_root() -> LocalPath:
    root = os.environ.get("SPEECHLM_STORAGE_CACHE") or os.path.join(tempfile.gettempdir(), "speechlm-storage-cache")
    return LocalPath(root)


def _slug(text: str) -> str:
    """A folder name unique to `text` (a URL), readable by its last part."""
    name = text.rstrip("/").rsplit("/", 1)[-1] or "root"
    return f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-{name}"


@functools.cache
def _download(text: str) -> str:
    source = path(text)
    destination = _cache_root() / _slug(text)
    partial = destination.with_name(destination.name + f".partial-{os.getpid()}")
    _remove(partial)
    if source.is_dir():
        partial.mkdir(parents=True)
        for relative, remote_file in files_under(source):
            local_file = partial / relative
            local_file.parent.mkdir(parents=True, exist_ok=True)
            local_file.write_bytes(remote_file.read_bytes())
    elif source.exists():
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(source.read_bytes())
    else:
        raise FileNotFoundError(f"{text} does not exist")
    _publish(partial, destination)
    return os.fspath(destination)


def _remove(p: LocalPath) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _publish(partial: LocalPath, destination: LocalPath) -> None:
    """Puts the finished download `partial` in place of `destination`, which other processes on
    this host (one per GPU) may be reading or publishing too: the old copy stays whole until the
    new one is complete, and is then swapped out in two renames, never deleted while in place."""
    if partial.is_file() and not destination.is_dir():
        os.replace(partial, destination)  # atomic over a file
        return
    old = destination.with_name(destination.name + f".old-{os.getpid()}")
    _remove(old)
    with contextlib.suppress(FileNotFoundError):
        os.replace(destination, old)
    try:
        os.replace(partial, destination)
    except OSError:
        # Another process published its copy between the two renames: it holds the same files.
        if not destination.exists():
            raise
        _remove(partial)
    _remove(old)


def local_copy(p: PathLike) -> LocalPath:
    """A local path holding what `p` holds: `p` itself when it is local, else a download of the
    file or folder (once per process) for libraries that read only local files."""
    if not is_remote(p):
        return LocalPath(os.fspath(p))
    return LocalPath(_download(os.fspath(path(p))))


@contextlib.contextmanager
def opened(p: PathLike, mode: str = "rb") -> Iterator:
    """`open` for local and store paths alike."""
    with path(p).open(mode) as f:
        yield f
