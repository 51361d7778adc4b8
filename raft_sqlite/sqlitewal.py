"""High-water mark of the durable WAL (``raft.db-hwm``): detection of silently lost commits.

SQLite uses the longest valid prefix of its WAL: a damaged frame, a damaged WAL header or a truncated
WAL file makes it drop every later commit *without an error*, and a deleted or emptied WAL is simply
a database with no recent commits. That is right for a torn last transaction, and silent data loss for
anything else. After each commit that is durable (FULL/EXTRA: after its WAL sync; NORMAL: after each
interval sync), the store records the WAL generation (its salts), ``mxFrame`` and whether that
generation is *checkpointed* (every frame up to ``mxFrame`` copied into ``raft.db``; read from the
-shm index header and its ``nBackfill``) in this small sidecar file with one ``pwrite`` (no fsync, no
extra SQLite page). The mark never runs ahead of the durable WAL. Only the rare transition to
"checkpointed" (a complete checkpoint: about every 1000 pages, and at close) costs two fsyncs: raft.db
(so the copied pages are on disk whoever checkpointed) and then the mark.

On open (:func:`lost_commits`), before anything is written, SQLite's view of the WAL is compared with
the mark (``S`` = marked generation, ``M`` = marked frames):

* a valid WAL header of generation ``S``: fewer than ``M`` valid frames is a loss (damaged frame or
  truncated file);
* a valid header of a *later* generation (salt-1 is a counter SQLite increments at every WAL restart,
  and it restarts only after a complete checkpoint): nothing lost; of an *earlier* generation (an
  older copy of the WAL put back): a loss; of an unrelated one (salt-1 not within 2**20 steps): a loss
  unless ``S`` was checkpointed (SQLite starts an unrelated generation when it re-creates a missing or
  empty WAL);
* no valid WAL header (file missing, empty, or header damaged): nothing lost if ``S`` was marked
  checkpointed, if the WAL still holds the frames of ``S`` and each is already in raft.db (a power cut
  tore the header of a restarted WAL), or if the -shm file as it was *before* SQLite opened it (read
  by the caller) shows a complete checkpoint of ``S`` or a later generation (a checkpoint run by
  another connection just before a crash), or if raft.db was written after the mark (a connection
  that outlived the store, e.g. a backup's reader or the ``sqlite3`` shell, completed the checkpoint
  and deleted the WAL) and the mark does not say BACKGROUND (written while the store's own background
  checkpointer ran: its partial checkpoints write raft.db after the mark, which proves nothing; the
  flag is synced before the checkpointer starts and cleared by a clean close); otherwise a loss.

A missing, torn (bad CRC) or foreign-format mark is no evidence and accepts anything; a stale mark (a
power cut lost its last pwrite) is older, and every rule above only asks "at least what was marked".
Each successful open re-anchors the mark (written and fsynced) to the state it validated.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
import time
import zlib
from collections.abc import Callable
from typing import IO, Literal, NamedTuple

from . import fsio

_REC = struct.Struct("<8sII")  # salts (raw bytes as in the WAL header), mxFrame, flags
_REC_V1 = struct.Struct("<8sI")  # format 1 (before the checkpointed flag): read as "not checkpointed"
MAGIC = b"RSQHWM2\0"
MAGIC_V1 = b"RSQHWM1\0"
CHECKPOINTED = 1  #: flag: every frame of the generation up to mxFrame is in the (synced) database file
#: flag: the store's own background checkpointer may write the database file after this mark (partial
#: PASSIVE checkpoints), so the file's mtime is no evidence of a complete checkpoint by another connection
BACKGROUND = 2
#: how far apart (in WAL restarts) two generations of one WAL may be and still count as related
GENERATION_WINDOW = 1 << 20
_SHM_INFO = 136  # WalIndexHdr twice (2 x 48 bytes), then WalCkptInfo (nBackfill at 96)

#: Opens a file for binary reading: the builtin :func:`open`, or :meth:`PinnedFiles.open`.
Opener = Callable[[str, Literal["rb"]], IO[bytes]]


class PinnedFiles:
    """Read-only descriptors of a live database's files for Python-level reads (the WAL checks on open).

    Closing *any* descriptor of a file drops every POSIX lock this process holds on it, SQLite's own
    included: a plain ``open(raft.db-shm).read()`` while the store's connection is open would drop
    SQLite's dead-man-switch lock on ``-shm``, and the next process opening the database read-write
    (the ``sqlite3`` shell) would then take it and truncate the wal-index under the live writer. So each
    file is opened once here and its descriptor is closed only by :meth:`close`, which the store calls
    after every SQLite connection to the file is closed. :meth:`open` returns a file object over the
    pinned descriptor that does not close it (use it in a ``with`` block, seek before reading)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._retired: list[int] = []  # descriptors of files replaced since they were pinned (closed by close())

    def open(self, path: str, mode: str = "rb") -> IO[bytes]:
        """A binary read-only file object for ``path`` over its pinned descriptor (FileNotFoundError
        like :func:`open` when the file does not exist)."""
        if mode != "rb":
            raise ValueError("PinnedFiles only reads")
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        f = open(fd, "rb", closefd=False)  # noqa: SIM115 - returned to the caller, who closes it
        f.seek(0)
        return f

    def fd(self, path: str) -> int:
        """The pinned read-only descriptor of ``path`` (opened on first use; OSError if it cannot be), for
        syncs made outside SQLite (``os.fdatasync`` of it flushes the file, whichever descriptor wrote)."""
        fd = self._fds.get(path)
        if fd is not None and os.fstat(fd).st_ino != os.stat(path).st_ino:
            # the file was replaced since it was pinned (a migration's connection deleted the WAL and SQLite
            # made a new one): pin the current file; the old descriptor is kept until close()
            self._retired.append(fd)
            fd = None
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def close(self) -> None:
        """Close every pinned descriptor (only once SQLite has closed the files)."""
        fds, self._fds = self._fds, {}
        retired, self._retired = self._retired, []
        for fd in [*fds.values(), *retired]:
            with contextlib.suppress(OSError):
                os.close(fd)


class Mark(NamedTuple):
    """A recorded high-water mark."""

    salts: bytes  #: the WAL generation (salt-1, salt-2 as in the WAL header)
    mx: int  #: frames of that generation known durable
    checkpointed: bool  #: those frames were all copied into the database file and it was synced
    background: bool = False  #: written while the store's background checkpointer ran (see BACKGROUND)


def shm_state(shm_map: bytes | mmap.mmap) -> tuple[bytes, int]:
    """(salts, mxFrame) from a mapped -shm file's first WalIndexHdr copy (native byte order)."""
    mx: int = struct.unpack_from("=I", shm_map, 16)[0]
    return shm_map[32:40], mx


def shm_backfill(shm_map: bytes | mmap.mmap) -> int:
    """``nBackfill`` of a mapped -shm file: the WAL frames already copied into the database file."""
    n: int = struct.unpack_from("=I", shm_map, 96)[0]
    return n


def generation_step(frm: bytes, to: bytes) -> int | None:
    """How many WAL restarts lead from generation ``frm`` to ``to`` (both 8-byte salts): 0 for the same
    generation, ``k > 0`` when ``to`` is ``k`` restarts later, ``-k`` when it is earlier, None when
    salt-1 is not within :data:`GENERATION_WINDOW` (an unrelated WAL)."""
    if frm == to:
        return 0
    a, b = int.from_bytes(frm[:4], "big"), int.from_bytes(to[:4], "big")
    ahead = (b - a) % (1 << 32)
    if 0 < ahead <= GENERATION_WINDOW:
        return ahead
    behind = (a - b) % (1 << 32)
    if 0 < behind <= GENERATION_WINDOW:
        return -behind
    return None  # also: same salt-1, other salt-2: not this WAL


class HighWaterMark:
    """Writer side: ``note()`` after a durable commit (and at close), ``anchor()`` after an open."""

    def __init__(self, db_path: str):
        self.path = db_path + "-hwm"
        created = not os.path.exists(self.path)
        # The mark and raft.db (whose fdatasync makes a checkpoint durable) go through the fsio seam, so
        # that tests can put them under the power-loss model; the -shm index is only mapped for reading.
        self.fd = fsio.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._db_fd = self._shm_fd = -1
        self._map: mmap.mmap | None = None
        try:
            self._db_fd = fsio.open(db_path, os.O_RDONLY)
            self._shm_fd = os.open(db_path + "-shm", os.O_RDONLY | os.O_CLOEXEC)
            self._map = mmap.mmap(self._shm_fd, _SHM_INFO, prot=mmap.PROT_READ)
            if created:  # the mark's directory entry must survive a power cut with its content
                fsio.sync_dir(os.path.dirname(self.path) or ".")
        except BaseException:
            self.close()
            raise
        self._last: tuple[bytes, int, bool, bool] | None = None
        #: set while the store's background checkpointer runs: every mark written carries BACKGROUND
        self.background = False
        #: called with ``("db" | "hwm", seconds)`` after each sync :meth:`note` makes (metrics)
        self.on_sync: Callable[[str, float], None] | None = None

    def current(self) -> tuple[bytes, int, int]:
        """(salts, mxFrame, nBackfill) of the WAL now, from the -shm index."""
        assert self._map is not None, "mapped by __init__, unmapped only by close()"
        return (*shm_state(self._map), shm_backfill(self._map))

    def note(self, state: tuple[bytes, int, int] | None = None, *, sync: bool = False) -> None:
        """Record ``state`` (default: the WAL state now; a ``current()`` taken before a WAL sync) as
        durable. Becoming checkpointed syncs raft.db, then writes and syncs the mark; ``sync`` syncs the
        mark in any case. Raises OSError if a write or sync fails (the caller fail-stops)."""
        salts, mx, backfilled = state or self.current()
        done = backfilled >= mx
        rec = (salts, mx, done, self.background)
        if rec == self._last and not sync:
            return
        if done:
            self._sync("db", self._db_fd)
        body = MAGIC + _REC.pack(salts, mx, (CHECKPOINTED if done else 0) | (BACKGROUND if self.background else 0))
        fsio.pwrite(self.fd, body + struct.pack("<I", zlib.crc32(body)), 0)
        if done or sync:
            self._sync("hwm", self.fd)
        self._last = rec

    def _sync(self, what: str, fd: int) -> None:
        t0 = time.perf_counter()
        fsio.fdatasync(fd)
        cb = self.on_sync
        if cb is not None:
            cb(what, time.perf_counter() - t0)

    def anchor(self) -> None:
        """After a successful open (the WAL is durable up to its current end): record the state now and
        sync the mark, replacing whatever evidence the open accepted."""
        self.note(sync=True)

    def close(self) -> None:
        # each one attempted whatever the others did
        with contextlib.suppress(OSError, ValueError):
            if self._map is not None:
                self._map.close()
        with contextlib.suppress(OSError, ValueError):
            if self._shm_fd >= 0:
                os.close(self._shm_fd)
        with contextlib.suppress(OSError, ValueError):
            if self._db_fd >= 0:
                fsio.close(self._db_fd)
        with contextlib.suppress(OSError, ValueError):
            fsio.close(self.fd)
        self._map, self._shm_fd, self._db_fd = None, -1, -1


def read_mark(db_path: str) -> Mark | None:
    """The recorded mark, or None when absent, torn (CRC) or of an unknown format."""
    try:
        with open(db_path + "-hwm", "rb") as f:
            data = f.read(len(MAGIC) + _REC.size + 4)
    except OSError:
        return None
    for magic, rec in ((MAGIC, _REC), (MAGIC_V1, _REC_V1)):
        n = len(magic) + rec.size
        if data.startswith(magic) and len(data) >= n + 4:
            body, crc = data[:n], struct.unpack_from("<I", data, n)[0]
            if zlib.crc32(body) != crc:
                return None
            salts, mx, *flags = rec.unpack(body[len(magic):])
            return Mark(salts, mx, bool(flags and flags[0] & CHECKPOINTED), bool(flags and flags[0] & BACKGROUND))
    return None


def read_shm(db_path: str) -> bytes | None:
    """The -shm file's index header and checkpoint info as they are now (call it *before* SQLite opens
    the database: the first connection rebuilds the file). None if missing or short."""
    try:
        with open(db_path + "-shm", "rb") as f:
            data = f.read(_SHM_INFO)
    except OSError:
        return None
    return data if len(data) == _SHM_INFO else None


def _shm_evidence(pre_shm: bytes | None, mark: Mark) -> bool:
    """True if a -shm image taken before SQLite opened the database (intact: both header copies equal,
    initialised, checksum valid) shows that every marked frame was checkpointed: a complete
    checkpoint of the marked generation, or a later generation (SQLite restarts only after one)."""
    if pre_shm is None or pre_shm[:48] != pre_shm[48:96] or pre_shm[12] != 1:
        return False
    if wal_checksum(pre_shm[:40], (0, 0), sys.byteorder == "big") != struct.unpack_from("=II", pre_shm, 40):
        return False
    salts, mx = shm_state(pre_shm)
    step = generation_step(mark.salts, salts)
    if step == 0:
        return mx >= mark.mx and shm_backfill(pre_shm) >= mark.mx
    return step is not None and step > 0


def wal_checksum(data: bytes, seed: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes) continued from ``seed``."""
    xs = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0, s1 = seed
    for i in range(0, len(xs), 2):
        s0 = (s0 + xs[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + xs[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_header_salts(wal_head: bytes) -> bytes | None:
    """The salts of a WAL header (first 32 bytes) if the header is valid (magic and checksum)."""
    if len(wal_head) < 32:
        return None
    magic = struct.unpack_from(">I", wal_head, 0)[0]
    if magic not in (0x377F0682, 0x377F0683):
        return None
    big = bool(magic & 1)  # 0x377f0683: big-endian checksums
    if wal_checksum(wal_head[:24], (0, 0), big) != struct.unpack_from(">II", wal_head, 24):
        return None
    return wal_head[16:24]


def frames_backfilled(db_path: str, salts: bytes, opener: Opener = open) -> bool:
    """True if every page carried by the WAL frames of generation ``salts`` (newest surviving version
    of each) is already identical in the database file: those frames were checkpointed, so SQLite
    ignoring them loses nothing. This is the case when a power cut tears the new header that a WAL
    restart writes (SQLite restarts the WAL only after backfilling every frame). ``opener`` opens the
    files for reading (a :meth:`PinnedFiles.open` while SQLite has them open)."""
    try:
        with opener(db_path, "rb") as db, opener(db_path + "-wal", "rb") as w:
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


def _checkpointed_since_mark(db_path: str) -> bool:
    """True if ``db_path`` was written after the mark file was last written: only a checkpoint writes
    raft.db, so another connection (a backup's read connection closing last, the ``sqlite3`` shell)
    completed a checkpoint after the store's last mark; such a connection deletes the WAL only after a
    complete, synced checkpoint. Deleting the WAL by hand does not touch raft.db. Strictly later only:
    a checkpoint inside the last marked commit has the same coarse timestamp as the mark."""
    try:
        return os.stat(db_path).st_mtime_ns > os.stat(db_path + "-hwm").st_mtime_ns
    except OSError:
        return False


def lost_commits(db_path: str, pre_shm: bytes | None = None, wal_existed: bool = True,
                 opener: Opener = open) -> str | None:
    """Compare SQLite's view of the WAL (call it after SQLite opened the file, before anything is
    written) with the recorded mark (see the module docstring for the rules); a description of the
    loss naming the file, or None. ``pre_shm``: :func:`read_shm` taken before SQLite opened the file;
    ``wal_existed``: whether the WAL file existed then (SQLite creates an empty one when it opens);
    ``opener``: opens the files for reading (:meth:`PinnedFiles.open`: SQLite has them open)."""
    mark = read_mark(db_path)
    if mark is None:
        return None
    wal = db_path + "-wal"
    try:
        with opener(db_path + "-shm", "rb") as f:
            hdr = f.read(48)
    except OSError:
        hdr = b""
    try:
        with opener(wal, "rb") as f:
            head = f.read(32)
        what = "is empty (0 bytes)" if not head else "has no valid header"
        if not wal_existed:
            what = "is missing"
    except FileNotFoundError:
        head, what = b"", "is missing"
    except OSError as exc:
        head, what = b"", f"cannot be read ({exc})"
    wsalts = wal_header_salts(head)
    gen = mark.salts.hex()
    if wsalts is None:
        if mark.checkpointed or mark.mx == 0 or frames_backfilled(db_path, mark.salts, opener) \
                or _shm_evidence(pre_shm, mark) or (not mark.background and _checkpointed_since_mark(db_path)):
            return None
        return (f"{wal} {what}, but {mark.mx} frames of WAL generation {gen} were recorded as durable and "
                "never as checkpointed into the database: the committed transactions in them are lost")
    mx = 0
    if len(hdr) == 48:
        salts, smx = shm_state(hdr)
        mx = smx if salts == wsalts else 0
    step = generation_step(mark.salts, wsalts)
    if step == 0:
        if mx < mark.mx:
            return (f"{wal}: only {mx} valid frames, but {mark.mx} were recorded as durable; SQLite would "
                    "silently drop committed transactions (damaged frame or truncated file)")
        return None
    if step is not None and step > 0:
        return None  # restarted after a complete checkpoint of the marked generation
    if step is None and mark.checkpointed:
        return None  # re-created after the marked generation was checkpointed
    older = f"an older generation ({-step} restarts before)" if step is not None else "an unrelated generation"
    return (f"{wal} holds {older} {wsalts.hex()}, but {mark.mx} frames of generation {gen} were recorded as "
            "durable: an older or foreign copy of the WAL; the committed transactions since are lost")


def wal_lost_commits(db_path: str, opener: Opener = open) -> str | None:
    """Detect committed transactions that SQLite will silently ignore: a damaged WAL frame makes SQLite
    stop at the last valid commit before it, and every later commit is dropped without an error.
    Called after SQLite has opened the file (its -shm index header then holds ``mxFrame``, the end of
    what it will use) and before anything is written. If, beyond the first commit frame that follows
    ``mxFrame`` (and the copies of it SQLite writes as sector padding), there is a frame of the same WAL
    generation (same salts), a later transaction was written after that commit had been synced:
    acknowledged data is being dropped, which is corruption, not a torn tail (a torn tail is always the
    last transaction). Returns a description or None. The high-water mark (:mod:`raft_sqlite.sqlitewal`)
    covers truncated WALs; this scan covers stores whose mark is stale.

    Only meaningful for stores written with a syncing fsync mode (FULL/EXTRA): with NORMAL/OFF several
    unsynced transactions may legitimately be torn at a power cut. ``opener`` opens the files for
    reading (:meth:`raft_sqlite.sqlitewal.PinnedFiles.open` while SQLite has them open).
    """
    wal, shm = db_path + "-wal", db_path + "-shm"
    try:
        with opener(shm, "rb") as f:
            hdr = f.read(48)
        wsize = os.path.getsize(wal)
    except OSError:
        return None
    if len(hdr) < 48 or wsize <= 32:
        return None
    sz = struct.unpack_from("=H", hdr, 14)[0]
    mx = struct.unpack_from("=I", hdr, 16)[0]
    page = 65536 if sz == 1 else sz
    if mx == 0 and page == 0:
        # SQLite found no valid commit at all (the first transaction of the generation is damaged): its
        # index header then carries no page size; take it from the WAL header (checked below)
        try:
            with opener(wal, "rb") as f:
                page = struct.unpack(">I", f.read(32)[8:12])[0]
        except (OSError, struct.error):
            return None
    if page < 512 or page > 65536 or page & (page - 1):
        return None
    fs = 24 + page
    nframes = (wsize - 32) // fs
    if nframes <= mx:
        return None
    with opener(wal, "rb") as f:
        head = f.read(32)
        salt = wal_header_salts(head)
        if salt is None or (mx and salt != hdr[32:40]):
            return None  # no valid header: nothing SQLite could have used is known to be lost
        big = bool(struct.unpack_from(">I", head, 0)[0] & 1)

        def frame(j: int) -> bytes:
            f.seek(32 + j * fs)
            return f.read(fs)

        def verifies(j: int, fr: bytes) -> bool:
            """Frame j's stored checksum follows from its predecessor's *stored* checksum (so one
            damaged frame does not hide intact frames after it)."""
            prev = head[24:32] if j == 0 else frame(j - 1)[16:24]
            stored = struct.unpack_from(">II", fr, 16)
            return wal_checksum(fr[:8] + fr[24:], struct.unpack(">II", prev), big) == stored

        commit: tuple[int, bytes] | None = None
        for j in range(mx, nframes):
            fr = frame(j)
            if fr[8:16] == salt and struct.unpack_from(">I", fr, 4)[0] != 0 and verifies(j, fr):
                commit = j, fr[:16]
                break
        if commit is None:
            return None
        j = commit[0] + 1
        # sector padding: SQLite repeats the commit frame (same page number, db size and salts) up to a
        # sector boundary when the device does not promise powersafe overwrite
        while j < nframes and frame(j)[:16] == commit[1]:
            j += 1
        for k in range(j, nframes):
            fr = frame(k)
            if fr[8:16] == salt and verifies(k, fr):
                return (f"{wal}: frame {mx + 1} is damaged but a later transaction (frame {k + 1} of "
                        f"{nframes}) was written after it had been synced; SQLite would silently drop "
                        f"{nframes - mx} frames of committed data")
    return None
