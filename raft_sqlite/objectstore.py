"""Backups that leave the machine: backup roots given as URLs, reached through fsspec.

A backup root URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``file:///mnt/backups``, anything
fsspec knows) holds the tree a local backup folder holds, ``<root>/<node_id>/<UTC stamp>/``, except that
each database file is **one object written as a stream**, compressed (zstd by default), and
``manifest.json`` is written last: an interrupted upload leaves a folder without a manifest, which is
never taken for a backup.

**Nothing is staged on the local disk.** The online backup API (``sqlite3_backup_step``) writes its
destination through :class:`StreamVFS`: an apsw VFS whose destination file is not a file but a
:class:`PageStream`. Measured (and checked on every copy): with ``journal_mode=OFF`` the backup writes
each page of the destination once, in ascending order, pages 2..N, and page 1 once or a few times (it
is dirtied again by the final commit). So the stream keeps page 1 in memory and passes every other page
on as it arrives; page 1 goes last, with its header made final (page count, journal mode, version
counters), and the object is the file with its first page moved to its end (``layout: page1-last``).
A write that breaks that order fails the backup with a clear error instead of producing a wrong copy.

The stream goes into an :class:`ObjectSink`: sha256 of the raw stream, zstd compression, then a bounded
queue drained by an uploader thread into ``fs.open(path, "wb")`` (a multipart upload on S3, parts of
``part_size`` bytes), with the compressed object's own size and sha256, so memory stays bounded by the
queue and one part whatever the file's size. An upload that fails or is cancelled is aborted
(``discard()``: the multipart upload is aborted, not completed with half the data).

Restore reads an object back with :func:`fetch_file`: compressed bytes hashed as they arrive, decompressed,
pages put back in place, the raw stream hashed, and both hashes compared with the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import apsw

from . import fsio
from .errors import BackupCorrupt, BackupError

#: How an object's stream is laid out: the database file with its first page moved to its end.
LAYOUT_PAGE1_LAST = "page1-last"
#: Compression names a manifest may record, and the object name suffix of each.
COMPRESSIONS = {"zstd": ".zst", "none": ""}
#: Default zstd level. Measured on a Raft-like store (benchmarks/remote_backup.py): level 1 compressed 4.86x
#: at 110-122 MB/s of one core, level 3 5.06x at 76-85 MB/s; the backup holds its read snapshot (and the
#: node's WAL grows) for as long as it runs, so speed wins.
ZSTD_LEVEL = 1
#: SQLite page cache (KiB) of a backup's source and destination connections: every page is read and written
#: once, so a cache buys nothing (with the store's 32 MiB and SQLite's default, a backup held ~96 MiB).
COPY_CACHE_KIB = 1024
#: Bytes per online-backup step (cancel and progress are checked between steps)
STEP_BYTES = 1 << 20
#: Default size of one uploaded part (S3 multipart: at least 5 MiB) and of the upload queue.
PART_SIZE = 8 << 20
QUEUE_BYTES = 16 << 20
_PIECE = 1 << 20
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_VFS_NAME = "raft_sqlite_stream"
#: the (non-existent) folder of the file names :class:`StreamVFS` gives its streams
_STREAM_DIR = "/raft-sqlite-stream/"
#: SQLite's lock byte (PENDING_BYTE): the page holding it is never written or read as data
_PENDING_BYTE = 0x40000000

ProgressFn = Callable[[str, int, int], None]


def compression_arg(compression: object) -> str:
    """``compression`` if it names one of :data:`COMPRESSIONS`, else ValueError."""
    if not isinstance(compression, str) or compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, not {compression!r}")
    return compression


def is_url(dest: object) -> bool:
    """True if ``dest`` is a URL (``scheme://...``), which selects the object-store backup format; a plain
    path (str or os.PathLike) selects the local folder format."""
    return isinstance(dest, str) and bool(_URL_RE.match(dest))


def _missing_package(url: str, exc: ImportError) -> BackupError:
    scheme = url.split("://", 1)[0].lower()
    extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
    hint = f"pip install 'raft_sqlite[{extra[scheme]}]'" if scheme in extra else "pip install 'raft_sqlite[remote]'"
    return BackupError(f"backups to {scheme}:// URLs need a package that is not installed ({exc}): {hint}")


def describe_error(url: str, exc: BaseException) -> str:
    """One line for an error raised by a file system while working on ``url``: names missing credentials
    and where each backend looks for them."""
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError") or "credential" in str(exc).lower():
        return (f"{url}: no usable credentials ({exc}). For S3 set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, ~/.aws/credentials, an instance role) and AWS_ENDPOINT_URL for an S3-compatible "
                "server, or pass storage_options={'key': ..., 'secret': ..., 'endpoint_url': ...}")
    return f"{url}: {name}: {exc}"


class Remote:
    """A backup root on an fsspec file system: ``url`` (without a trailing slash), ``fs`` and ``root`` (the
    path of the URL on ``fs``). ``storage_options`` go to fsspec (credentials, ``endpoint_url``, ...);
    without them each backend reads its usual environment variables and configuration files."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            import fsspec
            import fsspec.core
        except ImportError as exc:
            raise _missing_package(url, exc) from None
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as exc:
            raise _missing_package(url, exc) from None
        except (ValueError, TypeError, OSError) as exc:
            raise BackupError(f"cannot use backup destination {url}: {exc}") from None
        self.root = self.root.rstrip("/") or self.root
        from fsspec.implementations.local import LocalFileSystem
        #: a local (or mounted) file system: objects and folders are fsynced like a local backup's
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def url_of(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn a file system's error (any exception but our own) into :class:`BackupError` naming ``what``."""
        try:
            yield
        except BackupError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise their own types (botocore, aiohttp...)
            raise BackupError(f"{what}: {describe_error(self.url, exc)}") from exc

    def children(self, path: str) -> list[tuple[str, str, int]]:
        """``(name, type, size)`` of the entries directly under ``path`` (type ``"directory"`` or
        ``"file"``); a missing ``path`` lists as empty."""
        try:
            entries = self.fs.ls(path, detail=True, refresh=True) if not self.local else self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            out.append((name, str(e.get("type", "file")), int(e.get("size") or 0)))
        return out

    def exists(self) -> bool:
        """Whether the root's container exists: the folder on a local file system, else the first path
        component (the bucket or container). An existing bucket with no backups under the prefix yet
        exists."""
        if self.local:
            return os.path.isdir(self.root)
        with self.errors(f"cannot reach {self.url}"):
            return bool(self.fs.exists(self.root.split("/", 1)[0]))

    def read(self, path: str, limit: int) -> bytes:
        """The content of the object ``path`` (at most ``limit`` bytes; a longer one raises)."""
        with self.fs.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BackupCorrupt(f"{self.url_of(path)} is larger than {limit} bytes")
        return bytes(data)

    def write_small(self, folder: str, name: str, data: bytes) -> None:
        """Write the object ``folder/name`` whole: on a local file system atomically and durably (temp
        name, fsync, rename, fsync of the folder), elsewhere as one PUT (atomic by itself)."""
        if self.local:
            fsio.write_file_atomically(folder, name, data)
            return
        self.fs.pipe_file(f"{folder}/{name}", data)

    def make_folder(self, folder: str) -> None:
        """Create ``folder`` (a real directory on a local file system, synced into its parents; object
        stores have no folders, so nothing)."""
        if self.local:
            fsio.make_dirs(folder, 0o700)

    def remove(self, path: str) -> None:
        """Remove the folder (or object) ``path`` and everything under it."""
        if self.local:
            if os.path.isdir(path) and not os.path.islink(path):
                fsio.rmtree(path, ignore_errors=False)
            else:
                with contextlib.suppress(FileNotFoundError):
                    fsio.unlink(path)
            fsio.sync_dir(os.path.dirname(path))
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def stale_uploads(self, prefix: str, older_than: float) -> list[tuple[str, str]]:
        """``(key, upload_id)`` of the unfinished multipart uploads whose key starts with ``prefix`` (a
        path on this file system) and that were started more than ``older_than`` seconds ago. Only S3
        (s3fs) has such uploads; elsewhere the list is empty."""
        call = getattr(self.fs, "call_s3", None)
        if call is None or self.local:
            return []
        bucket, _, key_prefix = prefix.partition("/")
        now = time.time()
        out = []
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
        while True:  # one page holds at most 1,000 uploads: follow the markers
            page = call("list_multipart_uploads", **kw)
            for u in page.get("Uploads") or []:
                key = str(u.get("Key", ""))
                started = u.get("Initiated")
                age = now - started.timestamp() if hasattr(started, "timestamp") else float("inf")
                if key.startswith(key_prefix) and age >= older_than:
                    out.append((f"{bucket}/{key}", str(u["UploadId"])))
            if not page.get("IsTruncated"):
                return out
            kw["KeyMarker"], kw["UploadIdMarker"] = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")

    def abort_upload(self, path: str, upload_id: str) -> None:
        """Abort the multipart upload ``upload_id`` of ``path`` (its parts stop being billed)."""
        bucket, _, key = path.partition("/")
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


# ---------------------------------------------------------------------------------------------- upload
class _Writable(Protocol):
    def write(self, data: bytes) -> None: ...


class ObjectSink:
    """One object being written as a stream: ``write(raw)`` hashes the raw stream, compresses it and
    queues the result; an uploader thread writes the queue into ``remote.fs.open(path, "wb")``.

    Memory is bounded by ``queue_bytes``, the part being sent (``part_size``; s3fs keeps it in its buffer
    and sends a copy) and the compressor's window. A full queue blocks ``write`` (backpressure on the copy). ``max_rate`` (bytes per second of
    compressed data, None: unpaced) paces the upload. :meth:`finish` completes the object and returns
    ``{size, stream_sha256, object_size, object_sha256}``; :meth:`abort` discards it (an S3 multipart
    upload is aborted, not completed)."""

    def __init__(self, remote: Remote, path: str, *, compression: str = "zstd", level: int = ZSTD_LEVEL,
                 part_size: int = PART_SIZE, queue_bytes: int = QUEUE_BYTES, max_rate: float | None = None,
                 check_cancel: Callable[[], None] | None = None) -> None:
        self.remote, self.path, self.compression = remote, path, compression_arg(compression)
        self.size = 0
        self.object_size = 0
        self._raw = hashlib.sha256()
        self._obj = hashlib.sha256()
        self._pending = bytearray()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=max(1, queue_bytes // _PIECE))
        self._error: BaseException | None = None
        self._stop = threading.Event()  # abort(): the uploader stops writing and pacing at once
        self._check_cancel = check_cancel or (lambda: None)
        self._rate = max_rate
        self._file: Any = None
        self._compressor: Any = None
        if compression == "zstd":
            try:
                import zstandard
            except ImportError as exc:
                raise _missing_package(remote.url, exc) from None
            self._compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
        with remote.errors(f"cannot start the upload of {remote.url_of(path)}"):
            self._file = remote.fs.open(path, "wb", block_size=part_size)
        self._thread = threading.Thread(target=self._upload, name="raft_sqlite-upload", daemon=True)
        self._thread.start()

    def _upload(self) -> None:
        t0 = time.monotonic()
        sent = 0
        try:
            while True:
                piece = self._q.get()
                if piece is None:
                    return
                if self._error is not None or self._stop.is_set():
                    continue  # drain: the producer is told at its next write
                self._file.write(piece)
                sent += len(piece)
                if self._rate:
                    ahead = sent / self._rate - (time.monotonic() - t0)
                    if ahead > 0:
                        self._stop.wait(ahead)
        except BaseException as exc:  # noqa: BLE001 - reported to the producer
            self._error = exc
            while self._q.get() is not None:  # unblock the producer until it finishes or aborts
                pass

    def _emit(self, data: bytes, final: bool = False) -> None:
        if data:
            self._obj.update(data)
            self.object_size += len(data)
            self._pending += data
        while len(self._pending) >= _PIECE or (final and self._pending):
            piece = bytes(self._pending[:_PIECE])
            del self._pending[:_PIECE]
            self._put(piece)

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, BackupError):
            raise err
        raise BackupError(f"upload of {self.remote.url_of(self.path)} failed: "
                          f"{describe_error(self.remote.url, err)}") from err

    def _put(self, item: bytes | None) -> None:
        while True:  # a full queue blocks the copy, but never past a cancel or an upload error
            self._raise_error()
            self._check_cancel()
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def write(self, data: bytes) -> None:
        """Append ``data`` to the raw stream."""
        self._raw.update(data)
        self.size += len(data)
        self._emit(self._compressor.compress(data) if self._compressor is not None else bytes(data))

    def finish(self) -> dict[str, Any]:
        """Flush, complete the object and return what the manifest records of it."""
        if self._compressor is not None:
            self._emit(self._compressor.flush(), final=True)
        else:
            self._emit(b"", final=True)
        self._put(None)
        while self._thread.is_alive():
            self._thread.join(0.1)
            self._raise_error()
            self._check_cancel()
        self._raise_error()
        with self.remote.errors(f"cannot complete the upload of {self.remote.url_of(self.path)}"):
            self._file.close()
            if self.remote.local:
                fsio.fdatasync_path(self.path)
        return {"size": self.size, "stream_sha256": self._raw.hexdigest(), "object_size": self.object_size,
                "object_sha256": self._obj.hexdigest()}

    def abort(self) -> None:
        """Stop the upload and discard what was sent (best effort; never raises)."""
        self._error = self._error or BackupError("upload aborted")
        self._stop.set()
        with contextlib.suppress(BaseException):
            while True:
                self._q.get_nowait()
        with contextlib.suppress(BaseException):
            self._q.put_nowait(None)
        self._thread.join(timeout=60)
        f = self._file
        if f is None:
            return
        try:
            with contextlib.suppress(BaseException):
                if hasattr(f, "discard"):
                    f.discard()  # aborts an S3 multipart upload instead of completing it
        finally:
            with contextlib.suppress(BaseException):
                f.closed = True  # never completed by a later close() or by garbage collection
        with contextlib.suppress(BaseException):
            self.remote.fs.rm_file(self.path)


# ---------------------------------------------------------------------------------------------- streaming VFS
class PageStream:
    """The destination file of one online backup, as the VFS sees it: pages 2..N must arrive in order and
    are passed to ``sink.write`` at once; page 1 is kept (it may be written again) and :meth:`finish`
    writes it last with its header made final. Reads are served only for page 1 (SQLite reads the header);
    anything else that would need a page already passed on fails with :class:`BackupError`."""

    def __init__(self, name: str, page_size: int, sink: _Writable) -> None:
        self.name, self.page_size, self.sink = name, page_size, sink
        self.page1: bytes | None = None
        self.next = page_size  # byte offset the next streamed page must have
        #: offset of the page SQLite leaves unwritten in files over 1 GiB (it holds the lock byte)
        self.lock_page = (_PENDING_BYTE // page_size) * page_size
        self.error: str | None = None

    def _fail(self, msg: str) -> BackupError:
        self.error = self.error or f"{self.name}: the online backup broke the streaming order: {msg}"
        return BackupError(self.error)

    # ---- the VFS file methods (called by SQLite through apsw)
    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802 - apsw's method names
        if offset + amount <= self.page_size:
            return b"" if self.page1 is None else self.page1[offset:offset + amount]
        if offset >= self.next:
            return b""  # beyond what was written: SQLite reads zeros (a short read)
        raise self._fail(f"read of {amount} bytes at offset {offset}, already streamed")

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802
        if len(data) != self.page_size or offset % self.page_size:
            raise self._fail(f"write of {len(data)} bytes at offset {offset} (page size {self.page_size})")
        if offset == 0:
            self.page1 = bytes(data)
            return
        if offset == self.next + self.page_size and self.next == self.lock_page:
            # SQLite never writes the page holding the lock byte (offset 2**30): a hole that reads as zeros
            self.sink.write(bytes(self.page_size))
            self.next += self.page_size
        if offset == self.next:
            self.sink.write(bytes(data))
            self.next += self.page_size
        else:
            raise self._fail(f"page at offset {offset} written while offset {self.next} was expected next")

    def xTruncate(self, newsize: int) -> None:  # noqa: N802
        if newsize < self.xFileSize():
            raise self._fail(f"truncate to {newsize} bytes")

    def xFileSize(self) -> int:  # noqa: N802
        return self.next if (self.page1 is not None or self.next > self.page_size) else 0

    def xSync(self, flags: int) -> None:  # noqa: N802
        return None

    def xLock(self, level: int) -> None:  # noqa: N802
        return None

    def xUnlock(self, level: int) -> None:  # noqa: N802
        return None

    def xCheckReservedLock(self) -> bool:  # noqa: N802
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:  # noqa: N802
        return False

    def xSectorSize(self) -> int:  # noqa: N802
        return 4096

    def xDeviceCharacteristics(self) -> int:  # noqa: N802
        return 0

    def xClose(self) -> None:  # noqa: N802
        return None

    def finish(self) -> int:
        """Write page 1 last, its header made final: the page count (offset 28) and the version-valid-for
        number (92, equal to the change counter at 24, so the count is trusted), and the rollback-journal
        format (bytes 18/19 = 1: a self-contained file that needs no -wal). Returns the file's size."""
        if self.error is not None:
            raise BackupError(self.error)
        if self.page1 is None:
            raise self._fail("page 1 was never written")
        pages = self.next // self.page_size
        p1 = bytearray(self.page1)
        if p1[:16] != b"SQLite format 3\x00":
            raise self._fail("page 1 is not a SQLite header")
        p1[18] = p1[19] = 1
        p1[28:32] = struct.pack(">I", pages)
        p1[92:96] = p1[24:28]
        self.sink.write(bytes(p1))
        return pages * self.page_size


class StreamVFS(apsw.VFS):
    """An apsw VFS (registered once per process as ``raft_sqlite_stream``) that opens the file names given
    to :meth:`target` as their :class:`PageStream`; every other file goes to the default VFS."""

    _instance: StreamVFS | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__(_VFS_NAME, "")
        self._targets: dict[str, PageStream] = {}
        self._targets_lock = threading.Lock()

    @classmethod
    def get(cls) -> StreamVFS:
        with cls._lock:
            if cls._instance is None:
                cls._instance = StreamVFS()
            return cls._instance

    @contextlib.contextmanager
    def target(self, stream: PageStream) -> Iterator[str]:
        """Register ``stream`` under a fresh file name (yielded) for the duration of the block."""
        name = f"{_STREAM_DIR}{uuid.uuid4().hex}/{stream.name}"
        with self._targets_lock:
            self._targets[name] = stream
        try:
            yield name
        finally:
            with self._targets_lock:
                del self._targets[name]

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> Any:  # noqa: N802
        fn = name.filename() if isinstance(name, apsw.URIFilename) else name
        with self._targets_lock:
            stream = self._targets.get(fn) if fn else None
        if stream is not None:
            return stream
        return super().xOpen(name, flags)

    def xAccess(self, pathname: str, flags: int) -> bool:  # noqa: N802
        if pathname.startswith(_STREAM_DIR):
            return False  # no journal, no -wal beside a stream
        return bool(super().xAccess(pathname, flags))

    def xDelete(self, filename: str, syncdir: bool) -> None:  # noqa: N802
        if filename.startswith(_STREAM_DIR):
            return None
        return super().xDelete(filename, syncdir)


def stream_online_backup(src: apsw.Connection, name: str, sink: _Writable, *, pages_per_step: int | None,
                         progress: ProgressFn | None, check_cancel: Callable[[], None]) -> tuple[int, int]:
    """Copy the database of ``src`` (which holds its read transaction) into ``sink`` through the online
    backup API and :class:`StreamVFS`, ``pages_per_step`` pages per step (None: :data:`STEP_BYTES` worth);
    ``check_cancel()`` runs after every step and raises to stop. Returns the file's size in bytes and its
    page size."""
    row = src.execute("PRAGMA page_size").fetchone()
    assert row is not None, "PRAGMA page_size always returns one row"
    page_size = int(row[0])
    step = pages_per_step or max(1, STEP_BYTES // page_size)
    stream = PageStream(name, page_size, sink)
    vfs = StreamVFS.get()
    with vfs.target(stream) as fname:
        dest = apsw.Connection(fname, vfs=_VFS_NAME)
        try:
            dest.execute("PRAGMA synchronous=OFF").fetchall()
            dest.execute("PRAGMA journal_mode=OFF").fetchall()
            dest.execute(f"PRAGMA cache_size=-{COPY_CACHE_KIB}").fetchall()  # pages spill early: still in order
            try:
                with dest.backup("main", src, "main") as b:
                    while not b.done:
                        b.step(step)
                        if progress is not None:
                            progress(name, (b.pagecount - b.remaining) * page_size, b.pagecount * page_size)
                        check_cancel()
            except apsw.Error as exc:
                if stream.error is not None:
                    raise BackupError(stream.error) from exc
                raise
        finally:
            dest.close()
    return stream.finish(), page_size


# ---------------------------------------------------------------------------------------------- download
class _HashingReader:
    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.n += len(b)
        return bytes(b)


def fetch_file(remote: Remote, object_path: str, dest_path: str, entry: dict[str, Any],
               progress: ProgressFn | None = None) -> str:
    """Download the object ``object_path`` described by the manifest ``entry`` into the new local file
    ``dest_path`` (0600, fsynced): decompress, put page 1 back in front, and check the object's size and
    sha256 and the raw stream's size and sha256 against ``entry``. Returns the file's sha256.

    Errors, by whose fault: the backup's (a missing object, undecodable or extra data, a size or sha256
    that does not match) raise :class:`BackupCorrupt`; the backend's (network, permissions) raise
    :class:`BackupError`; the local disk's (``ENOSPC``, ``EIO``) raise ``OSError``. The partial file is
    left for the caller to remove."""
    url = remote.url_of(object_path)
    size = int(entry["size"])
    page_size = int(entry["page_size"])
    if size < page_size or size % page_size:
        raise BackupCorrupt(f"{url}: size {size} is not a whole number of {page_size}-byte pages")
    decompressor = None
    decode_errors: tuple[type[BaseException], ...] = ()
    if entry["compression"] == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise _missing_package(remote.url, exc) from None
        decompressor = zstandard.ZstdDecompressor()
        decode_errors = (zstandard.ZstdError,)
    raw = hashlib.sha256()
    n = 0
    body = size - page_size

    def read_from(reader: Any) -> bytes:
        try:
            return bytes(reader.read(_PIECE))
        except decode_errors as exc:
            raise BackupCorrupt(f"{url}: the compressed data does not decode ({exc})") from exc
        except BackupError:
            raise
        except Exception as exc:  # noqa: BLE001 - the backend's own errors (network, permissions)
            raise BackupError(f"cannot read backup object {url}: {describe_error(remote.url, exc)}") from exc

    try:
        f = remote.fs.open(object_path, "rb", block_size=PART_SIZE)
    except FileNotFoundError:
        raise BackupCorrupt(f"{url} is missing") from None
    except Exception as exc:  # noqa: BLE001
        raise BackupError(f"cannot read backup object {url}: {describe_error(remote.url, exc)}") from exc
    fd = fsio.open(dest_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with f:
            src = _HashingReader(f)
            reader: Any = (decompressor.stream_reader(src, read_size=_PIECE, closefd=False)  # type: ignore[arg-type]
                           if decompressor is not None else src)
            while b := read_from(reader):
                raw.update(b)
                if n + len(b) > size:
                    raise BackupCorrupt(f"{url} holds more than the {size} bytes its manifest records")
                head = max(0, min(len(b), body - n))  # bytes of pages 2..N, then page 1
                if head:
                    fsio.pwrite(fd, b[:head], page_size + n)
                if head < len(b):
                    fsio.pwrite(fd, b[head:], n + head - body)
                n += len(b)
                if progress is not None:
                    progress(str(entry["name"]), n, size)
            while read_from(src):  # bytes after the compressed data: hashed, so the object check fails
                pass
        fsio.fsync(fd)
    finally:
        fsio.close(fd)
    if src.n != entry["object_size"] or src.sha.hexdigest() != entry["object_sha256"]:
        raise BackupCorrupt(f"{url}: the object's size/sha256 ({src.n} bytes) do not match the manifest: it was "
                            "changed or damaged after the backup was written")
    if n != size or raw.hexdigest() != entry["stream_sha256"]:
        raise BackupCorrupt(f"{url}: the decompressed data ({n} bytes) does not match the manifest's size/sha256")
    h = hashlib.sha256()
    with open(dest_path, "rb", buffering=0) as fin:
        while chunk := fin.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()
