"""Where runs and prepared data live: a local (or NFS) directory, or object storage by URI.

A `Location` is a directory addressed either by a path or by a URI that `pyarrow.fs` resolves
(s3://, gs://, hdfs://, ...), the same addresses Ray Train takes for its `storage_path`. For an
S3-compatible server: `s3://bucket/runs?endpoint_override=HOST:PORT&scheme=http`, credentials
from the usual AWS variables.

Object storage has no atomic rename and no directory fsync, so callers never rely on either
there: they stage a directory on local disk and upload it file by file with the file that
marks it complete (a manifest) last. A single object appears whole or not at all, which is
what `write_text` relies on.

Every object-storage request is bounded: a connect timeout, a transfer that stalls for
`DCGAN_STORAGE_TIMEOUT_S` seconds (default 20) fails, and each request is tried
`DCGAN_STORAGE_ATTEMPTS` times (default 4) with the SDK's exponential backoff; pyarrow's own
defaults wait forever for a store that stops answering. What still fails is a `StorageError`
naming the store, the operation and the object.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Iterable, Optional, Union

from pipeline.durable import fsync_dir

PathOrUri = Union[str, Path]


# What pyarrow.fs.FileSystem.from_uri opens (as Ray Train's storage_path does).
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def is_uri(value: PathOrUri) -> bool:
    return "://" in str(value)


def uri_scheme(uri: str) -> str:
    return str(uri).partition("://")[0].lower()


# Query parameters by which pyarrow's URIs can carry secrets (S3: access_key, secret_key,
# session_token; GCS: access_token, credential_token_expiration).
SECRET_QUERY_KEYS = frozenset({"access_key", "secret_key", "session_token", "access_token", "credential_token_expiration"})


def credentials_in(uri: str) -> list[str]:
    """The parts of a URI that carry credentials: `user:secret@` before the host, secret query
    parameters. A run's address is written into config.yaml, every manifest, TensorBoard's
    hparams, logs and the lease record: it must hold none."""
    parts = urllib.parse.urlsplit(str(uri))
    found = ["user info before '@'"] if "@" in parts.netloc else []
    keys = [key for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    return found + [f"query parameter {key!r}" for key in keys if key.lower() in SECRET_QUERY_KEYS]


def redacted(uri: str) -> str:
    """The URI with its credentials (see credentials_in) replaced by '***', for messages."""
    parts = urllib.parse.urlsplit(str(uri))
    netloc = parts.netloc.rpartition("@")[2]
    netloc = f"***@{netloc}" if "@" in parts.netloc else netloc
    query = [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v)
             for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]  # fmt: skip
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=urllib.parse.urlencode(query, safe=":/*")))


def refuse_credentials(uri: str) -> None:
    """ValueError naming where the credentials sit (never their value) and where they belong."""
    found = credentials_in(uri)
    if found:
        raise ValueError(
            f"storage URI {redacted(uri)} carries credentials ({', '.join(found)}): a run's address is written "
            "into its config, checkpoint manifests, TensorBoard and logs. Give them to every node instead: "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), GOOGLE_APPLICATION_CREDENTIALS, or the "
            "node's role"
        )


def join(base: PathOrUri, name: str) -> str:
    """base/name for a path or a URI (whose query string stays at the end)."""
    if not is_uri(base):
        return str(Path(base) / name)
    head, sep, query = str(base).partition("?")
    return f"{head.rstrip('/')}/{name}{sep}{query}"


def cache_root() -> Path:
    """Node-local disk for staged checkpoints, downloaded shards and a remote run's live files."""
    return Path(os.environ.get("DCGAN_CACHE_DIR") or Path.home() / ".cache" / "dcgan")


def cache_dir_for(kind: str, address: str) -> Path:
    """A stable node-local directory for one remote address (readable name + a short digest)."""
    digest = hashlib.sha256(address.encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in address.split("?")[0])[-60:]
    return cache_root() / kind / f"{readable}-{digest}"


class StorageError(OSError):
    """An object-storage request that failed after its retries, or timed out."""


def request_timeout() -> float:
    return float(os.environ.get("DCGAN_STORAGE_TIMEOUT_S", 20))


def request_attempts() -> int:
    return max(1, int(os.environ.get("DCGAN_STORAGE_ATTEMPTS", 4)))


def _bounded(filesystem):
    """The same filesystem with bounded requests (see the module's docstring)."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.S3FileSystem):
        options = filesystem.__reduce__()[1][0]  # what from_uri read from the URI
        options.update(
            connect_timeout=min(10.0, request_timeout()), request_timeout=request_timeout(),
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=request_attempts()),
        )  # fmt: skip
        return pyarrow.fs.S3FileSystem(**options)
    if isinstance(filesystem, pyarrow.fs.GcsFileSystem):
        options = filesystem.__reduce__()[1][0]
        options["retry_time_limit"] = datetime.timedelta(seconds=request_timeout() * request_attempts())
        return pyarrow.fs.GcsFileSystem(**options)
    return filesystem


def _request(operation: str):
    """An ObjectLocation method whose failure (not an absent object) names the store."""

    def decorate(method):
        @functools.wraps(method)
        def bounded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (FileNotFoundError, StorageError):
                raise
            except OSError as err:
                name = next((arg for arg in args if isinstance(arg, str)), "")  # the object's name
                raise StorageError(
                    f"object store {self.store}: {operation} {self._path(name)!r} failed "
                    f"({request_attempts()} attempts, {request_timeout():.0f} s stall timeout each): {err}"
                ) from None

        return bounded

    return decorate


class Location:
    """A directory; names passed to its methods are relative paths below it ("a/b")."""

    is_local: bool

    def child(self, name: str) -> "Location":
        raise NotImplementedError

    def exists(self, name: str = "") -> bool:
        raise NotImplementedError

    def modified(self, name: str) -> Optional[float]:
        """When `name` was last written, in seconds since the epoch by the storage's own clock
        (None when the storage does not say); FileNotFoundError when absent."""
        raise NotImplementedError

    def read_text(self, name: str) -> str:
        raise NotImplementedError

    def write_text(self, name: str, text: str) -> None:
        """Replace `name` whole: a reader sees the old content or the new, never a mix."""
        raise NotImplementedError

    def list(self, name: str = "") -> list[str]:
        """Names of the entries directly below `name` (files and directories); [] if absent."""
        raise NotImplementedError

    def delete(self, name: str = "") -> None:
        """Remove a file or a whole directory; absent is fine."""
        raise NotImplementedError

    def move(self, name: str, new_name: str) -> None:
        """Move a directory (atomically on a filesystem; copy then delete on object storage)."""
        raise NotImplementedError

    def staging_dir(self, name: str) -> Path:
        """Where a directory bound for `name` is written on this node before `publish`."""
        raise NotImplementedError

    def publish(self, staged: Path, name: str, last: Iterable[str] = ()) -> Path:
        """Put the complete directory `staged` (from `staging_dir(name)`) at `name`, replacing
        what was there: a reader that waits for the files named in `last` never sees a mix of
        the two. Returns a directory on this node that holds the published files."""
        raise NotImplementedError

    def upload(self, local_dir: Path, name: str, last: Iterable[str] = ()) -> None:
        """Copy the files below `local_dir` to `name`, the files named in `last` after all others."""
        raise NotImplementedError

    def upload_file(self, local_file: Path, name: str) -> None:
        raise NotImplementedError

    def download(self, name: str, local_dir: Path) -> None:
        """Copy every file below `name` into `local_dir` (created if needed)."""
        raise NotImplementedError

    def download_file(self, name: str, target: Path) -> None:
        raise NotImplementedError


class LocalLocation(Location):
    is_local = True

    def __init__(self, path: PathOrUri):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalLocation({str(self.path)!r})"

    def child(self, name: str) -> "LocalLocation":
        return LocalLocation(self.path / name)

    def exists(self, name: str = "") -> bool:
        return (self.path / name).exists()

    def modified(self, name: str) -> Optional[float]:
        return (self.path / name).stat().st_mtime

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def write_text(self, name: str, text: str) -> None:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def list(self, name: str = "") -> list[str]:
        directory = self.path / name
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def delete(self, name: str = "") -> None:
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def move(self, name: str, new_name: str) -> None:
        target = self.path / new_name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path / name, target)
        fsync_dir(target.parent)

    def staging_dir(self, name: str) -> Path:
        return self.path / f"{name}.tmp"  # beside its final place: one rename publishes it

    def publish(self, staged: Path, name: str, last: Iterable[str] = ()) -> Path:
        final = self.path / name
        if final.exists():  # written again (a rerun after a crash, --fresh): replaced whole
            shutil.rmtree(final)
        staged.rename(final)
        fsync_dir(final.parent)
        return final

    # A filesystem location is written and read in place: nothing is ever copied to or from it
    # (the base class's upload / download raise NotImplementedError).


class ObjectLocation(Location):
    """A prefix in object storage (or any pyarrow filesystem), addressed by its URI."""

    is_local = False

    def __init__(self, uri: str, _resolved=None):
        import pyarrow.fs

        self.uri = uri
        if _resolved is None:
            refuse_credentials(uri)
            try:
                filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as err:
                raise ValueError(f"cannot open storage URI {uri!r}: {err}") from None
            _resolved = (_bounded(filesystem), root)
        self.fs, self.root = _resolved[0], _resolved[1].rstrip("/")

    @property
    def store(self) -> str:
        """The store, for messages: scheme://bucket (endpoint), no credentials, no options."""
        parts = urllib.parse.urlsplit(self.uri)
        endpoint = dict(urllib.parse.parse_qsl(parts.query)).get("endpoint_override")
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" + (f" at {endpoint}" if endpoint else "")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectLocation({self.uri!r})"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}".rstrip("/") if name else self.root

    def child(self, name: str) -> "ObjectLocation":
        return ObjectLocation(join(self.uri, name), (self.fs, self._path(name)))

    @_request("check")
    def exists(self, name: str = "") -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self._path(name)).type != pyarrow.fs.FileType.NotFound

    @_request("stat")
    def modified(self, name: str) -> Optional[float]:
        import pyarrow.fs

        info = self.fs.get_file_info(self._path(name))
        if info.type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(self._path(name))
        return info.mtime.timestamp() if info.mtime is not None else None

    @_request("read")
    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self._path(name)) as stream:  # FileNotFoundError when absent
            return stream.readall().decode()

    @_request("write")
    def write_text(self, name: str, text: str) -> None:
        with self.fs.open_output_stream(self._path(name)) as stream:  # one PUT: whole or nothing
            stream.write(text.encode())

    @_request("list")
    def list(self, name: str = "") -> list[str]:
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self._path(name), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    @_request("delete")
    def delete(self, name: str = "") -> None:
        import pyarrow.fs

        path = self._path(name)
        kind = self.fs.get_file_info(path).type
        if kind == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(path)
        elif kind == pyarrow.fs.FileType.File:
            self.fs.delete_file(path)

    @_request("move")
    def move(self, name: str, new_name: str) -> None:
        import pyarrow.fs

        source = self._path(name)
        for info in self.fs.get_file_info(pyarrow.fs.FileSelector(source, recursive=True)):
            if info.type == pyarrow.fs.FileType.File:
                self.fs.copy_file(info.path, self._path(new_name) + info.path[len(source) :])
        self.delete(name)

    def staging_dir(self, name: str) -> Path:
        return cache_dir_for("staging", str(self)) / name

    def publish(self, staged: Path, name: str, last: Iterable[str] = ()) -> Path:
        self.delete(name)  # no rename here: the old files go first, so none outlives the new `last`
        self.upload(staged, name, last)
        for older in staged.parent.iterdir():  # the newest staged copy stays, for reloads on this node
            if older != staged:
                shutil.rmtree(older, ignore_errors=True)
        return staged

    def upload(self, local_dir: Path, name: str, last: Iterable[str] = ()) -> None:
        last = list(last)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        ordered = [p for p in files if p.name not in last] + [p for name_ in last for p in files if p.name == name_]
        for item in ordered:
            relative = item.relative_to(local_dir).as_posix()
            self.upload_file(item, f"{name}/{relative}" if name else relative)

    @_request("upload")
    def upload_file(self, local_file: Path, name: str) -> None:
        with open(local_file, "rb") as source, self.fs.open_output_stream(self._path(name)) as sink:
            shutil.copyfileobj(source, sink, 1 << 20)

    @_request("download")
    def download(self, name: str, local_dir: Path) -> None:
        import pyarrow.fs

        base = self._path(name)
        selector = pyarrow.fs.FileSelector(base, recursive=True)
        for info in self.fs.get_file_info(selector):
            if info.type != pyarrow.fs.FileType.File:
                continue
            self._copy_out(info.path, Path(local_dir) / info.path[len(base) + 1 :])

    @_request("download")
    def download_file(self, name: str, target: Path) -> None:
        self._copy_out(self._path(name), target)

    def _copy_out(self, path: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(path) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)


def location(value: PathOrUri) -> Location:
    return ObjectLocation(str(value)) if is_uri(value) else LocalLocation(value)


class RunDirectory:
    """A run's directory, written in place on a filesystem. For a URI, the chief writes its live
    files (events, sample PNGs, config) to a node-local mirror and `sync` uploads what changed;
    checkpoints go through CheckpointManager's own staged upload."""

    def __init__(self, address: PathOrUri):
        self.location = location(address)
        self.local = self.location.path if self.location.is_local else cache_dir_for("runs", str(address))
        self._uploaded: dict[str, tuple[int, int]] = {}

    def start_fresh(self) -> None:
        """A new line of training begins here: a URI run's mirror on this node holds files of an
        older run of the same address (before `--fresh`, an earlier dry run), which `sync`
        would otherwise upload into this one."""
        if not self.location.is_local:
            shutil.rmtree(self.local, ignore_errors=True)
            self._uploaded.clear()

    def sync(self) -> None:
        if self.location.is_local or not self.local.is_dir():
            return
        for item in sorted(p for p in self.local.rglob("*") if p.is_file()):
            relative = item.relative_to(self.local).as_posix()
            stat = item.stat()
            if self._uploaded.get(relative) != (stat.st_size, stat.st_mtime_ns):
                self.location.upload_file(item, relative)
                self._uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
