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

A store that is unreachable for a while (a network blip, a restarting endpoint, throttling) does not fail a
sweep: every operation on a URI, ours and Ray's (the filesystem is handed to Tune and Train), is retried with
backoff for up to `$SPO_RAY_STORE_RETRY_S` seconds (default 120) by `RetryingFileSystem`, and only then
raises `StoreUnavailable`. An error that retrying cannot mend (no such bucket, refused credentials, a missing
file) is raised at once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs

T = TypeVar("T")

REMOTE_MARKER = ".remote"      # in a local mirror: the URI it mirrors
LOCAL_CACHE_ENV = "SPO_RAY_LOCAL_CACHE"
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose host is a bucket: its path on the filesystem is bucket/key
RETRY_ENV = "SPO_RAY_STORE_RETRY_S"
DEFAULT_RETRY_S = 120.0


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
def _filesystem(base: str, retrying: bool):
    fs = pyarrow.fs.FileSystem.from_uri(base)[0]
    if isinstance(fs, pyarrow.fs.S3FileSystem):
        # Writes in the calling thread: our handler's uploads run on pyarrow's IO threads (Ray's copy_files), and
        # a background write waits for a free IO thread, which a pool full of such uploads never has (a deadlock).
        rebuild, (options,) = fs.__reduce__()
        fs = rebuild({**options, "background_writes": False})
    return pyarrow.fs.PyFileSystem(RetryingFileSystem(fs, retry_budget_s(), base)) if retrying else fs


def filesystem(location: str | Path, retrying: bool = True):
    """`(pyarrow filesystem, path on it)` of a location; a URI's filesystem retries (`RetryingFileSystem`)
    unless `retrying` is False."""
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).absolute())
    split = urlsplit(str(location))
    # One filesystem object per bucket (or host) and query: creating an S3 client resolves the bucket's region.
    base = f"{split.scheme}://{split.netloc}" + (f"?{split.query}" if split.query else "")
    if split.scheme not in BUCKET_SCHEMES:
        return _filesystem(base, retrying), split.path
    return _filesystem(base, retrying), (split.netloc + split.path).rstrip("/")


def for_ray(location: str | Path) -> dict:
    """The `storage_path` (and `storage_filesystem`) arguments of Tune's and Train's RunConfig for a location,
    so that Ray's own uploads (checkpoints, experiment state) retry like ours."""
    if not is_uri(location):
        return {"storage_path": str(location)}
    fs, path = filesystem(location)
    return {"storage_path": path, "storage_filesystem": fs}


def exists(location: str | Path) -> bool:
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
    if not is_uri(probe):
        write_bytes(probe, b"")
        os.remove(probe)
        return
    fs, path = filesystem(probe, retrying=False)  # a store that is down at the start is bad input: no waiting
    with fs.open_output_stream(path):
        pass
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
            fs, path = filesystem(target)
            pyarrow.fs.copy_files(str(file), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


def download_dir(location: str | Path, local: str | Path) -> Path:
    """Copy the folder at `location` into `local` (staged, then renamed into place, so concurrent readers
    on this node see all of it or none). Returns `local`."""
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
# Retries

class StoreUnavailable(OSError):
    """The store stayed unreachable for the whole retry budget."""


# Fragments of pyarrow's messages for errors that a later attempt can mend (AWS SDK error names, curl's
# and the OS's connection errors, HTTP 5xx); anything else (no such bucket, access denied) is raised at once.
TRANSIENT_ERRORS = ("NETWORK_CONNECTION", "curlCode", "connect to server", "Connection refused", "Connection reset",
                    "Broken pipe", "timed out", "Timeout", "TIMEOUT", "SERVICE_UNAVAILABLE", "SLOW_DOWN",
                    "THROTTLING", "INTERNAL_FAILURE", "status code 5", "HTTP response code 5", "Unable to connect")


def retry_budget_s() -> float:
    return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)


def is_transient(error: BaseException) -> bool:
    if not isinstance(error, OSError) or isinstance(error, (FileNotFoundError, FileExistsError, IsADirectoryError,
                                                             NotADirectoryError, PermissionError, StoreUnavailable)):
        return False
    return any(fragment in str(error) for fragment in TRANSIENT_ERRORS)


class RetryingFileSystem(pyarrow.fs.FileSystemHandler):
    """A `pyarrow.fs.FileSystemHandler` around a store's filesystem: each operation that fails with a transient
    error is retried with exponential backoff (0.5 s doubling to 15 s, jittered) until the store has not
    answered for `budget_s`, then `StoreUnavailable` is raised. A write is staged in a local spooled file and
    uploaded whole when closed, so an upload that fails half-way is simply uploaded again; a read is fetched
    whole before it is returned. One line on stderr when the store stops answering and when it answers again.
    Picklable (Ray sends it to every trial and worker)."""

    def __init__(self, base, budget_s: float, name: str):
        self.base, self.budget_s, self.name = base, budget_s, name
        self._state()

    def _state(self):
        self.down_since: float | None = None
        self.uploads = threading.Lock()  # one upload at a time: pyarrow's S3 uploads from threads can hang

    def __getstate__(self):
        return {"base": self.base, "budget_s": self.budget_s, "name": self.name}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state()

    def call(self, operation, *args, **kwargs):
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                result = operation(*args, **kwargs)
            except OSError as error:
                if not is_transient(error):
                    raise
                now = time.monotonic()
                if self.down_since is None:  # when the failed try began: the SDK spends seconds retrying first
                    self.down_since = started
                    print(f"storage: {self.name} is not answering ({' '.join(str(error).split())[:200]}); retrying "
                          f"for up to {self.budget_s:.0f} s", file=sys.stderr, flush=True)
                # The budget counts from when the store stopped answering in this process, not per operation:
                # once it is spent, every operation fails after one try (a stopping sweep does not wait again).
                waited = now - self.down_since
                if waited >= self.budget_s:
                    raise StoreUnavailable(f"{self.name} did not answer for {waited:.0f} s: "
                                           f"{' '.join(str(error).split())}") from None
                time.sleep(min(delay, self.budget_s - waited) * random.uniform(0.5, 1.0))
                delay = min(2 * delay, 15.0)
                continue
            if self.down_since is not None:
                print(f"storage: {self.name} answers again after {time.monotonic() - self.down_since:.0f} s",
                      file=sys.stderr, flush=True)
                self.down_since = None
            return result

    # The FileSystemHandler interface
    def get_type_name(self):
        return f"retrying+{self.base.type_name}"

    def equals(self, other):
        return isinstance(other, RetryingFileSystem) and self.base.equals(other.base)

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.call(self.base.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self.call(self.base.get_file_info, selector)

    def create_dir(self, path, recursive):
        self.call(self.base.create_dir, path, recursive=recursive)

    def delete_dir(self, path):
        self.call(self.base.delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.call(self.base.delete_dir_contents, path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.call(self.base.delete_dir_contents, "/", accept_root_dir=True, missing_dir_ok=True)

    def delete_file(self, path):
        self.call(self.base.delete_file, path)

    def move(self, src, dest):
        self.call(self.base.move, src, dest)

    def copy_file(self, src, dest):
        self.call(self.base.copy_file, src, dest)

    def _fetch(self, path):
        def fetch():
            staged = tempfile.SpooledTemporaryFile(max_size=64 << 20)
            with self.base.open_input_stream(path) as stream:
                while chunk := stream.read(8 << 20):
                    staged.write(chunk)
            staged.seek(0)
            return staged
        return pyarrow.PythonFile(self.call(fetch), mode="r")

    def open_input_stream(self, path):
        return self._fetch(path)

    def open_input_file(self, path):
        return self._fetch(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_StagedUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"{self.name}: appending is not supported by object stores")

    def upload(self, staged, path, metadata):
        def put():
            staged.seek(0)
            with self.base.open_output_stream(path, metadata=metadata) as stream:
                while chunk := staged.read(8 << 20):
                    stream.write(chunk)
        with self.uploads:
            self.call(put)


class _StagedUpload:
    """The file object behind a `RetryingFileSystem` output stream: written locally, uploaded on close."""

    def __init__(self, fs: RetryingFileSystem, path: str, metadata):
        self.fs, self.path, self.metadata = fs, path, metadata
        self.staged = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        self.closed = False

    def write(self, data):
        return self.staged.write(data)

    def flush(self):
        pass

    def tell(self):
        return self.staged.tell()

    def writable(self):
        return True

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.fs.upload(self.staged, self.path, self.metadata)
        finally:
            self.staged.close()


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
