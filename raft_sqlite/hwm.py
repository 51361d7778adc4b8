"""High-water mark of the durable WAL (``raft.db-hwm``): detection of silently lost commits.

SQLite uses the longest valid prefix of its WAL: a damaged frame, a damaged WAL header or a truncated
WAL file makes it drop every later commit *without an error*. That is right for a torn last
transaction, and silent data loss for anything else. After each commit that is durable (FULL/EXTRA:
after its WAL sync; NORMAL: after each interval sync), the store records the WAL salts and ``mxFrame``
(read from the -shm index header) in this small sidecar file with one ``pwrite`` (no fsync, no extra
SQLite page). It never runs ahead of the durable WAL, so on open, if SQLite's valid prefix for the same
salts is *shorter* than the mark, committed frames are missing: corruption, handled per recovery
policy. A stale or torn mark (power cut) is older or fails its CRC, and is ignored.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

_REC = struct.Struct("<8sI")  # salts (raw bytes as in the WAL header), mxFrame
MAGIC = b"RSQHWM1\0"


def shm_state(shm_map) -> tuple[bytes, int]:
    """(salts, mxFrame) from a mapped -shm file's first WalIndexHdr copy (native byte order)."""
    return shm_map[32:40], struct.unpack_from("=I", shm_map, 16)[0]


class HighWaterMark:
    """Writer side: ``note()`` after a durable commit."""

    def __init__(self, db_path: str):
        self.path = db_path + "-hwm"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._shm_fd = os.open(db_path + "-shm", os.O_RDONLY)
        self._map = mmap.mmap(self._shm_fd, 48, prot=mmap.PROT_READ)
        self._last = None

    def current(self) -> tuple[bytes, int]:
        return shm_state(self._map)

    def note(self, state: tuple[bytes, int] | None = None) -> None:
        """Record ``state`` (default: the WAL state now) as durable."""
        salts, mx = state or shm_state(self._map)
        if (salts, mx) == self._last:
            return
        body = MAGIC + _REC.pack(salts, mx)
        os.pwrite(self.fd, body + struct.pack("<I", zlib.crc32(body)), 0)
        self._last = (salts, mx)

    def close(self) -> None:
        for closer in (self._map.close, lambda: os.close(self._shm_fd), lambda: os.close(self.fd)):
            try:
                closer()
            except (OSError, ValueError):
                pass


def read_mark(db_path: str) -> tuple[bytes, int] | None:
    """The recorded (salts, mxFrame), or None when absent or torn."""
    try:
        with open(db_path + "-hwm", "rb") as f:
            data = f.read(len(MAGIC) + _REC.size + 4)
    except OSError:
        return None
    if len(data) != len(MAGIC) + _REC.size + 4 or not data.startswith(MAGIC):
        return None
    body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    if zlib.crc32(body) != crc:
        return None
    return _REC.unpack(body[len(MAGIC):])


def _wal_header_ok(head: bytes) -> bool:
    """True if ``head`` starts with a WAL header SQLite accepts (magic and checksum valid)."""
    if len(head) < 32:
        return False
    magic = struct.unpack_from(">I", head, 0)[0]
    if magic not in (0x377F0682, 0x377F0683):
        return False
    fmt = ">II" if magic & 1 else "<II"  # 0x377f0683: big-endian checksums
    s0 = s1 = 0
    for i in range(0, 24, 8):
        x0, x1 = struct.unpack_from(fmt, head, i)
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return (s0, s1) == struct.unpack_from(">II", head, 24)


def wal_checksum(data: bytes, seed: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes) continued from ``seed``."""
    xs = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0, s1 = seed
    for i in range(0, len(xs), 2):
        s0 = (s0 + xs[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + xs[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def frames_backfilled(db_path: str, salts: bytes) -> bool:
    """True if every page carried by the WAL frames of generation ``salts`` (newest surviving version
    of each) is already identical in the database file: those frames were checkpointed, so SQLite
    ignoring them loses nothing. This is the case when a power cut tears the new header that a WAL
    restart writes (SQLite restarts the WAL only after backfilling every frame)."""
    try:
        with open(db_path, "rb") as db, open(db_path + "-wal", "rb") as w:
            dbh = db.read(100)
            if len(dbh) < 100:
                return False
            page = struct.unpack_from(">H", dbh, 16)[0]
            page = 65536 if page == 1 else page
            if page < 512:
                return False
            newest: dict[int, int] = {}
            size = os.fstat(w.fileno()).st_size
            for j in range((size - 32) // (24 + page)):
                w.seek(32 + j * (24 + page))
                h = w.read(24)
                if h[8:16] == salts:
                    newest[struct.unpack_from(">I", h, 0)[0]] = j
            if not newest:
                return False
            for pgno, j in newest.items():
                w.seek(32 + j * (24 + page) + 24)
                db.seek((pgno - 1) * page)
                if pgno < 1 or db.read(page) != w.read(page):
                    return False
            return True
    except OSError:
        return False


def lost_commits(db_path: str) -> str | None:
    """Compare SQLite's view of the WAL (after it opened the file) with the recorded mark; a
    description of the loss, or None."""
    mark = read_mark(db_path)
    if mark is None:
        return None
    try:
        with open(db_path + "-shm", "rb") as f:
            hdr = f.read(48)
    except OSError:
        return None
    if len(hdr) < 48:
        return None
    salts, mx = shm_state(hdr)
    msalts, mmx = mark
    if mx == 0:
        # SQLite found no valid frame. Only a valid WAL header of the marked generation proves that
        # marked frames are missing; an invalid header may be a torn WAL restart, which SQLite only
        # does once every frame of the previous generation is in the database file.
        from .validate import wal_header_salts

        try:
            with open(db_path + "-wal", "rb") as f:
                salts = wal_header_salts(f.read(32))
        except OSError:
            salts = None
        if salts is None:
            return None
    if salts == msalts and mx < mmx:
        return (f"{db_path}-wal: only {mx} valid frames, but {mmx} were recorded as durable; SQLite would "
                "silently drop committed transactions (damaged frame or truncated file)")
    return None
