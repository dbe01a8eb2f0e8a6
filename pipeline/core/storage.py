"""Where data lives: the one storage layer for inputs, output directories and model directories, addressed by URI.

  /data/out, data/out, file:///data/out   a POSIX directory (local disk, NFS, EFS, Lustre)
  s3://bucket/prefix                      S3 or an S3-compatible store (MinIO, Ceph, R2, ...)
  gs://bucket/prefix                      Google Cloud Storage

Object stores go through `obstore` (the Python face of the Apache Arrow project's Rust `object_store`): one library
for S3 and GCS whose listing is a stream of pages, so a prefix of a million objects is never one list in memory
(neither `pyarrow.fs` nor `fsspec` offers a public paged listing), and which reads the standard `AWS_*` variables
itself (`AWS_ENDPOINT_URL`, `AWS_REGION`, keys; pyarrow's S3 client ignores the endpoint variable). Credentials
in the AWS config files (`~/.aws/credentials`, `~/.aws/config`, `AWS_PROFILE`) come through boto3's standard chain
when no key is in the environment. Nothing here ever prints or records a credential: errors name the URI only.

Writes are atomic on both kinds: a POSIX file is written under a temporary name, fsynced and renamed; an object is
uploaded from a local scratch file by one put, which S3 and GCS make visible whole or not at all. Object stores
have no append and no rename; the commit protocol built on these writes is in pipeline/store/ledger.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from pipeline.core.errors import UserFacingError

REMOTE_SCHEMES = ("s3", "gs")
TMP_SUFFIX = ".tmp"  # a POSIX file being written; never a committed name


class StorageError(UserFacingError, OSError):
    """A URI that cannot be used, or a store that refused a request; the message names the URI and the fix."""


class UnsafeFile(StorageError):
    """In a directory read as data from elsewhere: a symbolic link below its root, or something that is not a
    regular file (a FIFO, a device, a socket) where a file is read. Never followed, read or deleted through."""


@dataclass(frozen=True)
class Entry:
    """One file or object: `rel` is its path below the listed root ("/"-separated), `uri` the whole address."""

    rel: str
    uri: str
    size: int
    mtime_ns: int


def is_remote(uri: str | os.PathLike) -> bool:
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def check_uri(uri: str | os.PathLike, what: str = "path") -> str:
    """The URI normalised (a local path made absolute), or StorageError for a scheme this layer cannot serve. A
    plain path is never mistaken for a URL and vice versa: `s3://b/x` no longer becomes a local folder `s3:`."""
    text = str(uri)
    parsed = urlparse(text)
    scheme = parsed.scheme
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        local = parsed.path if scheme == "file" else text
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{what} {text}: file:// URIs name a path on this machine (file:///abs/path)")
        return str(Path(os.path.expanduser(local)).absolute())
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{what} {text}: the {scheme}:// scheme is not supported; use a local path, file://, "
                           "s3:// (or an S3-compatible store through AWS_ENDPOINT_URL) or gs://")
    if "@" in parsed.netloc or parsed.password or parsed.username:
        raise StorageError(f"{what} {scheme}://...: credentials do not belong in a URI (they would end up in logs "
                           "and the ledger); put them in the environment or the provider's config files")
    if not parsed.netloc:
        raise StorageError(f"{what} {text}: no bucket; write {scheme}://BUCKET/PREFIX")
    if parsed.query or parsed.fragment:
        raise StorageError(f"{what} {text}: query strings and fragments are not part of an object path")
    return f"{scheme}://{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def join(uri: str, rel: str) -> str:
    """`uri` + "/" + `rel` for URIs and local paths alike."""
    rel = rel.strip("/")
    if not rel:
        return uri
    return f"{uri.rstrip('/')}/{rel}" if is_remote(uri) else str(Path(uri) / rel)


def parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if is_remote(uri) else str(Path(uri).parent)


def name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] if is_remote(uri) else Path(uri).name


class Storage:
    """A directory or prefix, read and written by paths relative to it. `open_storage(uri)` makes one."""

    uri: str
    remote: bool

    def join(self, rel: str) -> str:
        return join(self.uri, rel)

    # --- reading -------------------------------------------------------------------------------------------------
    def info(self, rel: str) -> Entry | None:
        raise NotImplementedError

    def exists(self, rel: str = "") -> bool:
        raise NotImplementedError

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The whole file; with `max_bytes`, a file larger than that is refused (StorageError) before it is read."""
        if max_bytes is not None:
            entry = self.info(rel)
            if entry is not None and entry.size > max_bytes:
                raise StorageError(f"{self.join(rel)}: {entry.size} bytes, over the {max_bytes} byte limit for it "
                                   "(docs/security.md); not read")
        with self.open_read(rel) as f:
            return f.read()

    def read_text(self, rel: str, max_bytes: int | None = None) -> str:
        data = self.read_bytes(rel, max_bytes)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise StorageError(f"{self.join(rel)}: not UTF-8 text ({exc})") from None

    def open_read(self, rel: str) -> BinaryIO:
        """A seekable binary file; the caller closes it."""
        raise NotImplementedError

    def list(self, rel: str = "") -> Iterator[Entry]:
        """Every file below `rel`, recursively, as a stream (pages of an object listing, or a directory walk)."""
        raise NotImplementedError

    def irregular(self, rel: str = "") -> Iterator[tuple[str, str]]:
        """(path, what it is) of everything below `rel` that `list` leaves out because it is not a regular file
        (a strict local directory's symlinks, FIFOs, devices, sockets). Object stores hold only objects."""
        return iter(())

    @contextmanager
    def local_copy(self, rel: str, scratch: str | None = None) -> Iterator[Path]:
        """A local path holding the file for the duration of the block: the file itself on POSIX, else a copy in
        `scratch` (the system temporary directory by default), deleted afterwards."""
        raise NotImplementedError
        yield

    def local_path(self, rel: str = "") -> Path | None:
        """The POSIX path of `rel`, or None for an object store."""
        return None

    def download(self, rel: str, dest: Path) -> None:
        """Copy `rel` to the local file `dest` (its folder is made), streamed."""
        raise NotImplementedError

    # --- writing -------------------------------------------------------------------------------------------------
    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A file to write `rel` into; it appears whole when the block ends without an exception, else never."""
        raise NotImplementedError
        yield

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def delete(self, rel: str) -> None:
        """Remove one file; a missing one is not an error."""
        raise NotImplementedError

    def delete_tree(self, rel: str) -> int:
        """Remove everything below `rel`; returns how many files went."""
        raise NotImplementedError

    def delete_many(self, rels: list[str]) -> None:
        """Remove these files (missing ones are fine): one request per thousand on an object store."""
        for rel in rels:
            self.delete(rel)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __reduce__(self):  # travels to Ray workers as its URI: clients are made again on the other side
        return open_storage, (self.uri,)


class LocalStorage(Storage):
    """A POSIX directory. `strict` (output directories, which may come from elsewhere): below the root nothing is a
    symbolic link, and only regular files are read, listed or deleted; a symlink or a special file where a file or
    folder is addressed raises UnsafeFile. The root itself is what the operator named and may be a link. (A race
    with someone changing the directory while it is read is outside this: the threat is a shared copy.)"""

    remote = False

    def __init__(self, uri: str, strict: bool = False):
        self.uri = uri
        self.root = Path(uri)
        self.strict = strict

    def _path(self, rel: str, last_may_link: bool = False) -> Path:
        if not self.strict:
            return self.root / rel if rel else self.root
        path = self.root
        parts = Path(rel).parts if rel else ()
        for i, part in enumerate(parts):
            if part in ("..", "/", ".") or os.sep in part:
                raise UnsafeFile(f"{self.root}: {rel!r} leaves the directory; refusing it")
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return self.root / rel  # the rest does not exist: nothing to follow
            if stat.S_ISLNK(mode) and not (last_may_link and i == len(parts) - 1):
                raise UnsafeFile(f"{path} is a symbolic link; an output directory is read without following links "
                                 "(replace it with the file or folder itself)")
        return path

    def checked_path(self, rel: str) -> Path:
        """The POSIX path of `rel`, which must be a regular file if it exists (strict mode): what callers that open
        files themselves must use."""
        path = self._path(rel)
        if self.strict:
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                return path
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                raise UnsafeFile(f"{path} is {_kind(mode)}, not a regular file; refusing to read it")
        return path

    def __reduce__(self):
        return LocalStorage, (self.uri, self.strict)

    def local_path(self, rel: str = "") -> Path:
        return self._path(rel)

    def info(self, rel: str) -> Entry | None:
        path = self.checked_path(rel)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return Entry(rel, str(path), st.st_size, st.st_mtime_ns)

    def exists(self, rel: str = "") -> bool:
        return self._path(rel).exists()

    def open_read(self, rel: str) -> BinaryIO:
        path = self._path(rel)
        if not self.strict:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the last component is no link either.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UnsafeFile(f"{path} is {_kind(mode)}, not a regular file; refusing to read it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def list(self, rel: str = "") -> Iterator[Entry]:
        for path, st in self._walk(rel):
            if stat.S_ISREG(st.st_mode) or (not self.strict and not stat.S_ISDIR(st.st_mode)):
                yield Entry(path.relative_to(self.root).as_posix(), str(path), st.st_size, st.st_mtime_ns)

    def irregular(self, rel: str = "") -> Iterator[tuple[str, str]]:
        if self.strict:
            for path, st in self._walk(rel):
                if not stat.S_ISREG(st.st_mode):
                    yield path.relative_to(self.root).as_posix(), _kind(st.st_mode)

    def _walk(self, rel: str) -> Iterator[tuple[Path, os.stat_result]]:
        """(path, stat) of each entry below `rel` in sorted order; strict: lstat, links never followed (a linked
        folder is an entry, not descended), else the files os.walk finds, stat'ed through links."""
        base = self._path(rel)
        try:
            top = os.lstat(base) if self.strict else os.stat(base)
        except OSError:
            return
        if not stat.S_ISDIR(top.st_mode):
            yield base, top
            return
        for root, dirs, files in os.walk(base):
            dirs.sort()
            names = sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]) if self.strict \
                else sorted(files)
            for file in names:
                path = Path(root) / file
                try:
                    st = os.lstat(path) if self.strict else path.stat()
                except OSError:
                    continue
                yield path, st

    @contextmanager
    def local_copy(self, rel: str, scratch: str | None = None) -> Iterator[Path]:
        yield self.checked_path(rel)

    def download(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(rel) as src, open(dest, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        path = self.checked_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: a reader or a crash sees all of it or none
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def delete(self, rel: str) -> None:
        # A link itself may be removed (unlink never follows the last component); never anything through one.
        self._path(rel, last_may_link=True).unlink(missing_ok=True)

    def delete_tree(self, rel: str) -> int:
        path = self._path(rel, last_may_link=True)
        if path.is_symlink():  # the link goes, never what it points to
            path.unlink()
            return 0
        if not path.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path, ignore_errors=True)  # removes links inside, never what they point to
        return count


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "not a regular file"


_STORES: dict[tuple[str, str, str], object] = {}
_STORES_LOCK = threading.Lock()


def _object_store(scheme: str, bucket: str):
    """One client per bucket and process (obstore clients pool their connections)."""
    # Keyed by the endpoint too: a process that points AWS_ENDPOINT_URL elsewhere (a test's server) gets a new client.
    key = (scheme, bucket, os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", ""))
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = _make_store(scheme, bucket)
        return store


def _make_store(scheme: str, bucket: str):
    try:
        from obstore.store import GCSStore, S3Store
    except ImportError:  # pragma: no cover - a dependency; said plainly if an install lacks it
        raise StorageError(f"{scheme}://{bucket}: object storage needs the obstore package (pip install obstore)") \
            from None
    if scheme == "gs":
        return GCSStore(bucket)  # GOOGLE_APPLICATION_CREDENTIALS / GOOGLE_SERVICE_ACCOUNT, else the ADC chain
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_options = {"allow_http": True} if endpoint and endpoint.startswith("http://") else None
    provider = None
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        provider = _config_file_credentials()
    kwargs = {"client_options": client_options} if client_options else {}
    if provider is not None:
        kwargs["credential_provider"] = provider
    # The store reads AWS_ENDPOINT_URL, AWS_REGION and the AWS_* keys from the environment itself; an endpoint other
    # than AWS's is addressed path-style, which every S3-compatible server accepts.
    return S3Store(bucket, **kwargs)


def _config_file_credentials():
    """boto3's standard chain (config files, AWS_PROFILE, SSO, instance roles) when the environment has no key; None
    when boto3 finds nothing either (then obstore's own chain: web identity, container and instance metadata)."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    session = boto3.Session()
    if session.get_credentials() is None:
        return None
    return Boto3CredentialProvider(session)


class ObjectStorage(Storage):
    remote = True

    def __init__(self, uri: str):
        parsed = urlparse(uri)
        self.uri = uri
        self.scheme, self.bucket = parsed.scheme, parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.store = _object_store(self.scheme, self.bucket)

    def _key(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.prefix}/{rel}".strip("/") if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _fail(self, exc: Exception, rel: str, doing: str) -> StorageError:
        # The library's message names the bucket and key, never a credential; keep its first line.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StorageError(f"{join(self.uri, rel)}: cannot {doing} ({detail[:300]}). Check the bucket, the "
                            "AWS_*/GOOGLE_* settings and that this identity may access it")

    def info(self, rel: str) -> Entry | None:
        import obstore

        try:
            meta = obstore.head(self.store, self._key(rel))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(exc, rel, "look it up") from None
        return self._entry(meta)

    def _entry(self, meta) -> Entry:
        rel = self._rel(meta["path"])
        stamp = meta.get("last_modified")
        return Entry(rel, join(self.uri, rel), int(meta["size"]), int(stamp.timestamp() * 1e9) if stamp else 0)

    def exists(self, rel: str = "") -> bool:
        if self.info(rel) is not None:
            return True
        return next(self.list(rel), None) is not None  # a "directory": some object below it

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        import obstore

        if max_bytes is not None:
            return super().read_bytes(rel, max_bytes)
        try:
            return obstore.get(self.store, self._key(rel)).bytes().to_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(join(self.uri, rel)) from None
        except Exception as exc:
            raise self._fail(exc, rel, "read it") from None

    def open_read(self, rel: str) -> BinaryIO:
        import obstore

        try:
            return _Reader(obstore.open_reader(self.store, self._key(rel), buffer_size=1 << 20))
        except FileNotFoundError:
            raise FileNotFoundError(join(self.uri, rel)) from None
        except Exception as exc:
            raise self._fail(exc, rel, "open it") from None

    def list(self, rel: str = "") -> Iterator[Entry]:
        import obstore

        prefix = self._key(rel) or None
        try:
            # Pages of up to 1000 keys (one S3 ListObjectsV2 response each): memory holds one page at a time.
            for page in obstore.list(self.store, prefix, chunk_size=1000):
                for meta in page:
                    yield self._entry(meta)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._fail(exc, rel, "list it") from None

    @contextmanager
    def local_copy(self, rel: str, scratch: str | None = None) -> Iterator[Path]:
        fd, tmp = tempfile.mkstemp(prefix="s2v-", suffix=Path(rel).suffix, dir=scratch)
        os.close(fd)
        try:
            self.download(rel, Path(tmp))
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def download(self, rel: str, dest: Path) -> None:
        import obstore

        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:
            try:
                for chunk in obstore.get(self.store, self._key(rel)):  # streamed, never whole in memory
                    f.write(chunk)
            except FileNotFoundError:
                raise FileNotFoundError(join(self.uri, rel)) from None
            except OSError:
                raise
            except Exception as exc:
                raise self._fail(exc, rel, "download it") from None

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        import obstore

        # Written to local scratch first, then uploaded by one put (multipart when large): the object appears only
        # once complete, and an exception in the block uploads nothing.
        fd, tmp = tempfile.mkstemp(prefix="s2v-up-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            try:
                obstore.put(self.store, self._key(rel), Path(tmp), chunk_size=16 << 20)
            except Exception as exc:
                raise self._fail(exc, rel, "write it") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self.store, self._key(rel), data)
        except Exception as exc:
            raise self._fail(exc, rel, "write it") from None

    def delete(self, rel: str) -> None:
        import obstore

        try:
            obstore.delete(self.store, self._key(rel))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(exc, rel, "delete it") from None

    def delete_tree(self, rel: str) -> int:
        count, batch = 0, []
        for entry in self.list(rel):
            batch.append(entry.rel)
            if len(batch) == 1000:
                self.delete_many(batch)
                count, batch = count + len(batch), []
        self.delete_many(batch)
        return count + len(batch)

    def delete_many(self, rels: list[str]) -> None:
        import obstore

        for start in range(0, len(rels), 1000):  # S3's DeleteObjects takes up to 1000 keys
            try:
                obstore.delete(self.store, [self._key(rel) for rel in rels[start:start + 1000]])
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise self._fail(exc, rels[start], "delete it") from None


class _Reader:
    """obstore's ReadableFile as a Python binary file (tarfile, PyAV and webdataset want `read` to return bytes)."""

    def __init__(self, raw):
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read() if size is None or size < 0 else self._raw.read(size)
        return data.to_bytes() if hasattr(data, "to_bytes") else bytes(data)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_storage(uri: str | os.PathLike, what: str = "path", strict: bool = False) -> Storage:
    """The storage at `uri` (checked by `check_uri`). `strict`: a local directory is read as data from elsewhere
    (`LocalStorage`); output directories are always opened so."""
    uri = check_uri(uri, what)
    return ObjectStorage(uri) if is_remote(uri) else LocalStorage(uri, strict)
