"""A fault-injecting apsw VFS for crash, power-loss and I/O-error tests.

``FaultVFS`` wraps a real VFS ("": the default, "unix"). I/O goes to the real files,
so SQLite behaves normally, while each tracked file keeps a *durable image* (its
content at its last successful xSync) plus the writes and truncates since then. ::

    vfs = FaultVFS("fault")                   # registers with apsw
    con = apsw.Connection(path, vfs="fault")
    vfs.arm_crash(at_sync=3)                  # power is lost at the 3rd xSync from now
    ...                                       # the workload fails with apsw.IOError
    vfs.write_crash_image(target, mode="subset", seed=1)
    apsw.Connection(os.path.join(target, "db"))   # reopen with the normal VFS

What reached the disk, per file. ``lose``: the durable image. ``subset``: if the
size changed since the last sync, the old or new size at random (an unsynced
truncate/extension may persist); each 512-byte sector touched by an unsynced write
holds its durable or its current (page cache) content, at random. ``garble``: as
subset, but a third of those sectors get random bytes where written since the sync
(unwritten bytes keep their durable value: SQLITE_IOCAP_POWERSAFE_OVERWRITE).
A file never synced since its creation is absent; from its first sync on, its
directory entry is durable (SQLite syncs the directory at a WAL/journal's first
sync); xDelete is durable at once. The -shm file (mapped by the unix VFS, never
opened through xOpen) is left out: SQLite rebuilds it. A file that exists when
first opened counts as durable as found; use a fresh FaultVFS per run.

Crash points count calls from arming (1 = the next). That call does not happen:
the state is frozen as the crash image, and it and every later read, write, sync,
truncate, open or delete of a tracked file raise apsw.IOError, so the code under
test makes no progress. ``arm_error`` fails chosen calls with SQLITE_IOERR_* or
SQLITE_FULL instead; a failed call has no effect.

apsw raises an exception from a VFS method even when SQLite ignored that error
(e.g. a failed auto-checkpoint after a durable commit): an operation that raised
may have committed. Faults it cannot raise go to sys.unraisablehook, where
``quiet_injected_faults()`` drops them. Limitations: files are held in memory;
a failed fsync leaves its data pending (Linux may drop it); xShm*, locks and file
controls pass through and are never faulted.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading

import apsw

SECTOR = 512
MODES = ("lose", "subset", "garble")
_KINDS = ("write", "sync", "truncate")
_IOERR = {
    "read": apsw.SQLITE_IOERR_READ,
    "write": apsw.SQLITE_IOERR_WRITE,
    "sync": apsw.SQLITE_IOERR_FSYNC,
    "truncate": apsw.SQLITE_IOERR_TRUNCATE,
    "delete": apsw.SQLITE_IOERR_DELETE,
    "open": apsw.SQLITE_IOERR,
}


def _fail(code: int, why: str) -> apsw.Error:
    """The apsw exception for SQLite result ``code`` with a message saying it was injected."""
    exc = apsw.exception_for(code)
    exc.args = (f"faultvfs: {why}",)
    exc.faultvfs_injected = True
    return exc


@contextlib.contextmanager
def quiet_injected_faults():
    """Within the block, drop reports of injected faults that apsw can only send to
    ``sys.unraisablehook`` (a fault SQLite chose to ignore, or one hit during SQLite's
    clean-up after an earlier fault); anything else still reaches the previous hook."""
    prev = sys.unraisablehook

    def hook(u):
        e = u.exc_value
        while getattr(e, "faultvfs_injected", False):
            e = e.__context__
        if u.exc_value is None or e is not None:
            prev(u)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = prev


def _apply(buf: bytearray, ops: list, mask: bool = False) -> bytearray:
    """Apply pending ops to ``buf`` in place; with ``mask``, mark written bytes with 1."""
    for off, data in ops:
        if data is None:  # truncate (or extend) to ``off`` bytes
            del buf[off:]
            buf.extend(bytes(off - len(buf)))
            continue
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = b"\x01" * len(data) if mask else data
    return buf


class _State:
    """Durable image (``None``: the file does not durably exist) plus pending ops of one file."""

    __slots__ = ("durable", "pending")

    def __init__(self, path: str) -> None:
        self.pending: list = []  # (offset, bytes) for a write, (size, None) for a truncate
        try:
            with open(path, "rb") as f:
                self.durable: bytearray | None = bytearray(f.read())
        except FileNotFoundError:
            self.durable = None


class _File(apsw.VFSFile):
    """A tracked file: passes I/O to the base VFS and records it in its ``_State``."""

    def __init__(self, vfs: FaultVFS, name, flags, state: _State) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs, self._st = vfs, state

    def xRead(self, amount: int, offset: int) -> bytes:
        if self._vfs.crashed:
            raise _fail(_IOERR["read"], "read after power loss")
        return super().xRead(amount, offset)

    def xWrite(self, data, offset: int) -> None:
        with self._vfs._lock:
            self._vfs._event("write")
            super().xWrite(data, offset)
            self._st.pending.append((offset, bytes(data)))

    def xTruncate(self, newsize: int) -> None:
        with self._vfs._lock:
            self._vfs._event("truncate")
            super().xTruncate(newsize)
            self._st.pending.append((newsize, None))

    def xSync(self, flags: int) -> None:
        with self._vfs._lock:
            self._vfs._event("sync")
            super().xSync(flags)
            st = self._st
            st.durable = _apply(bytearray() if st.durable is None else st.durable, st.pending)
            st.pending = []


class FaultVFS(apsw.VFS):
    """Fault-injecting VFS registered with apsw as ``name``, inheriting from VFS ``base``.

    ``root``: only files under this directory are tracked and faulted (default:
    every named, non-temporary file opened through this VFS). Temporary files
    are always passed through untouched. ``counters``: writes/syncs/truncates
    attempted on tracked files. Keep a reference: apsw unregisters a collected VFS.
    """

    def __init__(self, name: str = "fault", base: str = "", root: str | None = None) -> None:
        super().__init__(name, base)
        self.name, self.base = name, base
        self.root = os.path.realpath(root) if root is not None else None
        self._lock = threading.Lock()
        self._files: dict[str, _State] = {}
        self.counters = {k + "s": 0 for k in _KINDS}  # calls attempted on tracked files
        self.crashed = False
        self._frozen: dict | None = None
        self._crash: list | None = None  # [kind, calls left]
        self._errors: dict[str, list] = {}  # kind -> [calls left, exception, sticky]

    def arm_crash(self, at_sync: int | None = None, at_write: int | None = None) -> None:
        """Lose power at the ``at_sync``-th xSync (or ``at_write``-th xWrite) from now, 1-based."""
        kind, n = ("sync", at_sync) if at_sync is not None else ("write", at_write)
        if (at_sync is None) == (at_write is None) or n < 1:
            raise ValueError("give exactly one of at_sync/at_write, >= 1")
        with self._lock:
            self._crash = [kind, n]

    def arm_error(self, kind: str, nth: int = 1, error: str = "ioerr", sticky: bool = False) -> None:
        """Fail the ``nth`` ``kind`` call ("write"|"sync"|"truncate") from now with
        ``error`` ("ioerr": SQLITE_IOERR_WRITE/FSYNC/TRUNCATE, "full": SQLITE_FULL).
        ``sticky``: every later call of that kind fails too, until ``clear_faults()``."""
        if kind not in _KINDS or error not in ("ioerr", "full") or nth < 1:
            raise ValueError((kind, nth, error))
        code = _IOERR[kind] if error == "ioerr" else apsw.SQLITE_FULL
        with self._lock:
            self._errors[kind] = [nth, code, sticky]

    def clear_faults(self) -> None:
        """Disarm crash and error injection and forget a crash (I/O works again)."""
        with self._lock:
            self._crash, self._errors, self.crashed, self._frozen = None, {}, False, None

    def write_crash_image(self, target_dir: str, mode: str = "lose", seed: int = 0) -> list[str]:
        """Write what reached the disk into ``target_dir`` and return the paths written.

        Uses the state frozen at the crash point, or the current state if no crash
        happened. Files keep their names (relative to ``root``, else the basename);
        files absent from the image and every ``*-shm`` there are removed.
        """
        with self._lock:
            snap = self._frozen if self.crashed else self._snapshot()
        names = [self._relname(p) for p in snap]
        if mode not in MODES or len(set(names)) < len(names):
            raise ValueError(f"bad mode {mode!r} or clashing file names {sorted(names)}")
        rng, written = random.Random(seed), []
        for path in sorted(snap):
            durable, pending = snap[path]
            dst = os.path.join(target_dir, self._relname(path))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            for stale in (dst, dst + "-shm"):
                if os.path.exists(stale):
                    os.remove(stale)
            if durable is None:
                continue
            with open(dst, "wb") as f:
                f.write(self._image(durable, pending, mode, rng))
            written.append(dst)
        return written

    def _relname(self, path: str) -> str:
        return os.path.relpath(path, self.root) if self.root else os.path.basename(path)

    def _snapshot(self) -> dict:
        return {
            p: (None if s.durable is None else bytes(s.durable), list(s.pending))
            for p, s in self._files.items()
        }

    @staticmethod
    def _image(old: bytes, pending: list, mode: str, rng: random.Random) -> bytes:
        if mode == "lose" or not pending:
            return old
        new, mask = _apply(bytearray(old), pending), _apply(bytearray(len(old)), pending, mask=True)
        size = len(new) if len(new) == len(old) else rng.choice((len(old), len(new)))
        img = bytearray(old[:size]) + bytes(max(0, size - len(old)))
        for s in range(0, min(size, len(new)), SECTOR):
            e = min(s + SECTOR, size, len(new))
            if not any(mask[s:e]):
                continue
            r = rng.random()
            if mode == "garble" and r < 1 / 3:
                noise = rng.randbytes(e - s)
                img[s:e] = bytes(noise[i] if mask[s + i] else img[s + i] for i in range(e - s))
            elif r >= (2 / 3 if mode == "garble" else 1 / 2):
                img[s:e] = new[s:e]
        return bytes(img)

    def _event(self, kind: str) -> None:
        """Count a ``kind`` call on a tracked file; raise if it must crash or fail. Lock held."""
        if self.crashed:
            raise _fail(_IOERR[kind], f"{kind} after power loss")
        self.counters[kind + "s"] += 1
        if self._crash and self._crash[0] == kind:
            self._crash[1] -= 1
            if self._crash[1] == 0:
                self._frozen, self.crashed, self._crash = self._snapshot(), True, None
                raise _fail(_IOERR[kind], f"power lost at this {kind}")
        err = self._errors.get(kind)
        if err:
            err[0] -= 1
            if err[0] <= 0:
                if not err[2]:
                    del self._errors[kind]
                raise _fail(err[1], f"injected {kind} error")

    def _tracked(self, path: str | None, flags: int) -> str | None:
        if path is None or flags & apsw.SQLITE_OPEN_DELETEONCLOSE:
            return None
        real = os.path.realpath(path)
        if self.root and os.path.commonpath([self.root, real]) != self.root:
            return None
        return real

    def xOpen(self, name, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        real = self._tracked(path, flags[0])
        if real is None:
            return apsw.VFSFile(self.base, name, flags)
        if self.crashed:
            raise _fail(_IOERR["open"], "open after power loss")
        with self._lock:
            state = self._files.get(real) or self._files.setdefault(real, _State(real))
        return _File(self, name, flags, state)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        real = self._tracked(filename, 0)
        if real is not None and self.crashed:
            raise _fail(_IOERR["delete"], "delete after power loss")
        super().xDelete(filename, syncdir)
        with self._lock:
            self._files.pop(real, None)
