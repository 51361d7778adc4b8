"""Reading a snapshot: :class:`SnapshotReader`, a seekable stream over its chunks that verifies each
chunk's CRC32 and, read through, the sha256 of the whole snapshot."""

from __future__ import annotations

import bisect
import hashlib
import io
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from ..errors import CorruptionError
from .manifest import SnapshotMeta

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer  # typeshed-only name (what io.RawIOBase.readinto accepts)


class ChunkSource(Protocol):
    """Where a :class:`SnapshotReader` reads chunks from: the node's
    :class:`~raft_sqlite.snapshot.SnapshotStore`, or a read-only view of a data_dir
    (:class:`raft_sqlite.snapview.SnapshotView`, which ``raft-sqlite snapshot`` uses beside a running node)."""

    @property
    def chunks_path(self) -> str:
        """The path of ``chunks.db`` (for messages)."""
        ...

    def chunk_shape(self, sid: int) -> list[tuple[int, int]]:
        """``(seq, length)`` of every chunk of snapshot ``sid``, in order."""
        ...

    def read_chunk(self, sid: int, seq: int) -> tuple[bytes, int] | None:
        """``(data, crc32)`` of one chunk, or None if it does not exist."""
        ...

    def pin(self, sid: int) -> None:
        """Snapshot ``sid`` is being read (retention must keep it)."""
        ...

    def unpin(self, sid: int) -> None:
        """Release one :meth:`pin`."""
        ...


class SnapshotReader(io.RawIOBase):
    """A readable, seekable binary stream over one snapshot's chunks (:meth:`SnapshotManager.open`).

    Each chunk's CRC32 is checked when it is loaded; a stream read from offset 0 to the end without
    seeking also checks the sha256 of the whole snapshot before reporting end of stream. Any
    mismatch, missing chunk or size disagreement raises :class:`CorruptionError` naming the file,
    group, snapshot and chunk. Memory: one chunk. The snapshot is pinned (retention skips it) until
    the stream is closed. ``read(n)`` returns exactly ``n`` bytes unless the end is reached.
    """

    def __init__(self, sstore: ChunkSource, meta: SnapshotMeta, *, size: int | None = None,
                 checksum: str | None = None, shape: list[tuple[int, int]] | None = None,
                 verify_digest: bool = True):
        super().__init__()
        self._s = sstore
        self.meta = meta
        self._where = f"{sstore.chunks_path}: group {meta.group!r}: snapshot {meta.id}"
        sstore.pin(meta.id)
        self._pinned = True
        try:
            shape = sstore.chunk_shape(meta.id) if shape is None else shape
            size = meta.size if size is None else size
            offs: list[int] = []
            total = 0
            for i, (seq, n) in enumerate(shape):
                if seq != i:
                    raise CorruptionError(f"{self._where}: chunk {i} is missing")
                offs.append(total)
                total += n
            if meta.status == "DURABLE" and len(shape) != meta.chunk_count:
                raise CorruptionError(f"{self._where}: {len(shape)} chunks found, manifest says {meta.chunk_count}")
            if total != size:
                raise CorruptionError(f"{self._where}: chunks hold {total} bytes, manifest says {size}")
        except BaseException:
            self.close()
            raise
        self._offs, self._size = offs, size
        self._checksum = meta.checksum if checksum is None else checksum
        self._digest_on = verify_digest
        self._pos = 0
        self._cur_seq, self._cur = -1, b""
        self._hash = hashlib.sha256()
        self._hashed = 0  # next seq to hash (sequential reading only)
        self._sequential = True
        self._verified = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        if pos != self._pos:
            self._sequential = False  # the digest can no longer be checked on this stream
        self._pos = pos
        return pos

    def _load(self, seq: int) -> bytes:
        if seq == self._cur_seq:
            return self._cur
        return self._accept(seq, self._s.read_chunk(self.meta.id, seq))

    def _accept(self, seq: int, got: tuple[bytes, int] | None, crc_ok: bool | None = None) -> bytes:
        """Verify chunk ``seq`` as read (``(data, crc32)`` or None) and make it current. ``crc_ok``: the
        CRC32 was already checked (by the prefetch thread)."""
        if got is None:
            raise CorruptionError(f"{self._where}: chunk {seq} is missing")
        data, crc = got
        if not (crc_ok if crc_ok is not None else zlib.crc32(data) == crc):
            raise CorruptionError(f"{self._where}: chunk {seq} fails its CRC32 check")
        if seq + 1 < len(self._offs) and self._offs[seq + 1] - self._offs[seq] != len(data):
            raise CorruptionError(f"{self._where}: chunk {seq} changed size while being read")
        if self._sequential and seq == self._hashed:
            if self._digest_on:
                self._hash.update(data)
            self._hashed += 1
        self._cur_seq, self._cur = seq, data
        return data

    def _check_digest(self) -> None:
        if self._sequential and not self._verified and self._hashed == len(self._offs):
            if self._digest_on and self._checksum is not None and self._hash.hexdigest() != self._checksum:
                raise CorruptionError(f"{self._where}: sha256 of the snapshot does not match its manifest")
            self._verified = True

    def readinto(self, b: WriteableBuffer) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed snapshot stream")
        pos = self._pos
        if pos >= self._size:
            self._check_digest()
            return 0
        seq = bisect.bisect_right(self._offs, pos) - 1
        data = self._load(seq)
        start = pos - self._offs[seq]
        mv = memoryview(b)
        n = min(len(mv), len(data) - start)  # == len(b) (typeshed's buffer type has no len())
        mv = mv.cast("B")
        mv[:n] = data[start:start + n]
        self._pos = pos + n
        if self._pos >= self._size:
            self._check_digest()
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        out = bytearray()
        while len(out) < size:
            pos = self._pos
            if pos >= self._size:
                self._check_digest()
                break
            seq = bisect.bisect_right(self._offs, pos) - 1
            data = self._load(seq)
            start = pos - self._offs[seq]
            take = min(size - len(out), len(data) - start)
            if take == len(data) and not out and take == size:
                self._pos = pos + take
                if self._pos >= self._size:
                    self._check_digest()
                return data
            out += data[start:start + take]
            self._pos = pos + take
            if self._pos >= self._size:
                self._check_digest()
        return bytes(out)

    def readall(self) -> bytes:
        return self.read(max(0, self._size - self._pos))

    def chunks(self, prefetch: int = 2) -> Iterator[bytes]:
        """Yield the remaining bytes chunk by chunk (as stored), verifying as :meth:`read` does.

        A helper thread reads up to ``prefetch`` chunks ahead from chunks.db while the caller's
        thread verifies (CRC32, sha256) and consumes, so I/O and hashing overlap; memory stays at
        ``prefetch + 1`` chunks. ``prefetch=0`` reads inline."""
        if self._pos >= self._size:
            self._check_digest()
            return
        first = bisect.bisect_right(self._offs, self._pos) - 1
        if prefetch <= 0 or len(self._offs) - first < 3:
            yield from self._chunks_inline()
            return
        # items: (seq, (data, crc32) or None, CRC32 ok), or (-1, the fetch thread's exception, None)
        q: queue.Queue[tuple[int, tuple[bytes, int] | BaseException | None, bool | None]] = queue.Queue(
            maxsize=prefetch)
        stop = threading.Event()
        sid, sstore = self.meta.id, self._s

        def fetch() -> None:
            try:
                for seq in range(first, len(self._offs)):
                    got = sstore.read_chunk(sid, seq)
                    # the CRC32 here, the sha256 in the consumer: both release the GIL, so they overlap
                    item = (seq, got, got is not None and zlib.crc32(got[0]) == got[1])
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer
                q.put((-1, exc, None))

        t = threading.Thread(target=fetch, name=f"raft_sqlite-snapshot-read-{sid}", daemon=True)
        t.start()
        try:
            for _ in range(first, len(self._offs)):
                seq, got, crc_ok = q.get()
                if isinstance(got, BaseException):  # fetch() failed (it puts seq -1 with its exception)
                    raise got
                data = self._accept(seq, got, crc_ok)
                start = self._pos - self._offs[seq]
                self._pos += len(data) - start
                if self._pos >= self._size:
                    self._check_digest()
                yield data if start == 0 else data[start:]
        finally:
            stop.set()
            t.join()
        self._check_digest()

    def _chunks_inline(self) -> Iterator[bytes]:
        while self._pos < self._size:
            seq = bisect.bisect_right(self._offs, self._pos) - 1
            data = self._load(seq)
            start = self._pos - self._offs[seq]
            self._pos += len(data) - start
            if self._pos >= self._size:
                self._check_digest()
            yield data if start == 0 else data[start:]
        self._check_digest()

    def close(self) -> None:
        if getattr(self, "_pinned", False):
            self._pinned = False
            self._s.unpin(self.meta.id)
        super().close()

