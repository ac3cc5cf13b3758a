"""Where experiments live: a local folder, or a URI of any filesystem `pyarrow.fs` knows (`s3://`, `gs://`,
`abfs://`, `hdfs://`, …) — the layer Ray Tune and Ray Train use for the same `storage_path`.

A sweep writes its tables, its reference log-prob tables and its shared init cache through these functions,
so a cluster whose nodes share nothing but the Ray cluster and a bucket works like one machine:

- `join`, `exists`, `read_bytes`, `write_bytes` (atomic: a local file is renamed into place, an object
  store's PUT is atomic already), `upload_dir` / `download_dir` (a folder, its marker file last / first);
- `local_mirror(location)`: the node-local folder that stands in for a shared cache location — the location
  itself when it is local, else `$SPO_RAY_LOCAL_CACHE/mirror/<hash>` (default `~/.cache/spo-ray`), tagged
  with the URI it mirrors (`remote_of`), so code that needs real files (model folders) can fetch them;
- `build_lock(name)`: held by whoever builds a shared artefact, so two processes never build the same one.
  Locally a lock file; in a Ray sweep the driver's lease actor (`spo_ray.distributed`) is installed with
  `use_cluster_lock`, because a lock file on one node's disk means nothing to another node.

Credentials and endpoints come from the environment, as pyarrow reads them (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server, `GOOGLE_APPLICATION_CREDENTIALS`, …)
or from the URI's query (`s3://bucket/path?endpoint_override=host:port&scheme=http`); never from a config file.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

REMOTE_MARKER = ".remote"      # in a local mirror: the URI it mirrors
LOCAL_CACHE_ENV = "SPO_RAY_LOCAL_CACHE"
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose host is a bucket: its path on the filesystem is bucket/key


def is_uri(location: str | Path) -> bool:
    """True for `scheme://…` (a one-letter scheme is a Windows drive, not a URI)."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and "://" in str(location)


def absolute(location: str | Path) -> str:
    """A URI as given; a local path made absolute (so trials started elsewhere find it)."""
    return str(location) if is_uri(location) else str(Path(location).absolute())


def join(location: str | Path, *parts: str) -> str:
    """`location/part/…`, keeping a URI's query (`?endpoint_override=…`) at the end."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, _, query = str(location).partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


@functools.lru_cache(maxsize=32)
def _filesystem(base: str):
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(base)[0]


def filesystem(location: str | Path):
    """`(pyarrow filesystem, path on it)` of a location."""
    import pyarrow.fs
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).absolute())
    split = urlsplit(str(location))
    if split.scheme not in BUCKET_SCHEMES:
        return pyarrow.fs.FileSystem.from_uri(str(location))
    # One filesystem object per bucket and query: creating an S3 client resolves the bucket's region.
    base = f"{split.scheme}://{split.netloc}" + (f"?{split.query}" if split.query else "")
    return _filesystem(base), (split.netloc + split.path).rstrip("/")


def exists(location: str | Path) -> bool:
    import pyarrow.fs
    if not is_uri(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    """A file's bytes; FileNotFoundError naming the location when it is not there."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    try:  # one request: pyarrow raises FileNotFoundError for a missing object (no HEAD first)
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {location}") from None


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file so that a reader never sees half of it."""
    if is_uri(location):
        fs, path = filesystem(location)
        with fs.open_output_stream(path) as stream:  # an object appears when its upload completes
            stream.write(data)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_writable(location: str | Path) -> None:
    """Write and delete a small file under `location`, so that a missing bucket, refused credentials or an
    unreachable endpoint fail here, as one OSError, before anything is computed."""
    probe = join(location, f".spo-ray-probe-{uuid.uuid4().hex[:8]}")
    write_bytes(probe, b"")
    fs, path = filesystem(probe)
    fs.delete_file(path)


def make_dirs(location: str | Path) -> None:
    if is_uri(location):
        fs, path = filesystem(location)
        fs.create_dir(path, recursive=True)
    else:
        Path(location).mkdir(parents=True, exist_ok=True)


def upload_dir(local: str | Path, location: str | Path, *, last: str | None = None) -> None:
    """Copy a local folder's files to `location`, the file named `last` after all the others: a reader
    that waits for `last` (a marker such as init.json) never finds the folder half copied."""
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == last)
    for file in files:
        target = join(location, *file.relative_to(local).parts)
        if is_uri(location):
            import pyarrow.fs
            fs, path = filesystem(target)
            pyarrow.fs.copy_files(str(file), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


def download_dir(location: str | Path, local: str | Path) -> Path:
    """Copy the folder at `location` into `local` (staged, then renamed into place, so concurrent readers
    on this node see all of it or none). Returns `local`."""
    import pyarrow.fs
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.parent / f".{local.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    fs, path = filesystem(location)
    pyarrow.fs.copy_files(path, str(staging), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    try:
        os.rename(staging, local)
    except OSError:  # another process on this node got there first; its copy is the same
        shutil.rmtree(staging, ignore_errors=True)
        if not local.exists():
            raise
    return local


# ---------------------------------------------------------------------------------------------------
# Node-local mirrors of shared cache locations

def local_root() -> Path:
    return Path(os.environ.get(LOCAL_CACHE_ENV) or Path.home() / ".cache" / "spo-ray")


def local_mirror(location: str | Path) -> str:
    """The local folder to use for a cache `location`: itself when local, else this node's mirror of it."""
    if not is_uri(location):
        return str(location)
    mirror = local_root() / "mirror" / hashlib.sha256(str(location).encode()).hexdigest()[:16]
    marker = mirror / REMOTE_MARKER
    if not marker.exists():
        mirror.mkdir(parents=True, exist_ok=True)
        write_bytes(marker, str(location).encode())
    return str(mirror)


def remote_of(local_dir: str | Path) -> str | None:
    """The URI a local mirror stands for, or None for an ordinary folder."""
    marker = Path(local_dir) / REMOTE_MARKER
    return marker.read_text().strip() if marker.exists() else None


# ---------------------------------------------------------------------------------------------------
# Locks: one builder per shared artefact

_cluster_lock = None


def use_cluster_lock(lock_factory) -> None:
    """Install `lock_factory(name)` (a context manager) as the lock of every `build_lock` in this process."""
    global _cluster_lock
    _cluster_lock = lock_factory


@contextmanager
def build_lock(name: str, near: str | Path | None = None):
    """Hold the lock on building `name`. The cluster's lock where one is installed; else a lock file beside
    `near` when that is a local folder (shared by every process that sees the folder), else in this node's
    local cache root."""
    if _cluster_lock is not None:
        with _cluster_lock(name):
            yield
        return
    folder = Path(near) if near is not None and not is_uri(near) else local_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



def built_once(name: str, near: str | Path, read: Callable[[], T | None], build: Callable[[], T]) -> tuple[T, bool]:
    """A shared artefact, built by one process only: `read()` it (None: missing or unreadable), else take
    `build_lock(name)`, read again (another process may have built it meanwhile) and else `build()` it —
    `build` writes it where `read` looks. Returns (the artefact, whether it was read rather than built)."""
    found = read()
    if found is not None:
        return found, True
    with build_lock(name, near=near):
        found = read()
        if found is not None:
            return found, True
        return build(), False
