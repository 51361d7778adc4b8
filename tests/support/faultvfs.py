"""A fault-injecting apsw VFS and file-system backend for crash, power-loss and I/O-error tests.

``FaultVFS`` wraps a real VFS ("": the default, "unix"). I/O goes to the real files, so SQLite
behaves normally, while the VFS keeps a *model of the disk*: for each tracked file its *durable
image* (its content at its last successful sync) plus the writes and truncates since then, and for
each tracked directory its current and its durable entries. ``vfs.fs`` (a :class:`FaultFS`, the
:mod:`raft_sqlite.fsio` backend) puts the files the library writes itself (``raft.db-hwm``, the files
created at store creation, backups, ...) into the same model::

    vfs = FaultVFS("fault", root=data_dir)    # registers with apsw
    with fsio.installed(vfs.fs):
        vfs.arm_crash(at_sync=3)              # power is lost at the 3rd sync from now
        ...                                   # the workload fails with apsw.IOError / OSError(EIO)
    vfs.write_crash_image(target, mode="subset", seed=1)
    apsw.Connection(os.path.join(target, "raft.db"))   # reopen with the normal VFS

What reached the disk, per file. ``lose``: the durable image. ``subset``: if the size changed since
the last sync, the old or new size at random (an unsynced truncate/extension may persist); each
512-byte sector touched by an unsynced write holds its durable or its current (page cache) content,
at random. ``garble``: as subset, but a third of those sectors get random bytes where written since
the sync (unwritten bytes keep their durable value: SQLITE_IOCAP_POWERSAFE_OVERWRITE). This holds for
SQLite's files and for files written through ``vfs.fs`` alike.

Directory entries (the *dir-entry rule*). A name created (``open`` with ``O_CREAT``, ``mkdir``),
renamed or removed through ``vfs.fs`` is durable only once ``sync_dir`` of its directory returned:
until then a ``lose`` image keeps the directory's old entries (a new file is absent, a removed one is
back, a renamed one has its old name), and ``subset``/``garble`` images pick the old or the new entry
at random, name by name. A renamed directory carries its entries (it is the same directory). SQLite's
own files keep the rule of the unix VFS: a journal or WAL SQLite creates is absent until its first
sync, which fsyncs the directory (unixOpen's syncDir: the directory's whole current state becomes
durable); a database file SQLite creates needs a ``sync_dir`` like any other name; xDelete is durable
only when SQLite passes ``syncdir`` (EXTRA's journal delete), else at the directory's next sync (so a
deleted DELETE-mode journal can come back after a power cut, as on a POSIX file system). A file or directory that exists when the model first meets it counts as durable
as found (with a ``root``: everything under it when the FaultVFS is made); use a fresh FaultVFS per
run. The -shm file (mapped by the unix VFS, never opened through
xOpen) is left out: SQLite rebuilds it.

Crash points count calls from arming (1 = the next): ``at_sync`` counts SQLite's xSync and
``vfs.fs``'s ``fsync``/``fdatasync``/``sync_dir``; ``at_write`` counts xWrite and ``vfs.fs``'s
``write``/``pwrite``. That call does not happen: the state is frozen as the crash image, and it and
every later read, write, sync, truncate, open, rename or delete of a tracked file raise (apsw.IOError
through SQLite, ``OSError(EIO)`` through ``vfs.fs``; ``close`` still closes), so the code under test
makes no progress. ``arm_error`` fails chosen calls with SQLITE_IOERR_* or SQLITE_FULL instead
(``OSError(EIO)``/``OSError(ENOSPC)`` through ``vfs.fs``); a failed call has no effect.

apsw raises an exception from a VFS method even when SQLite ignored that error (e.g. a failed
auto-checkpoint after a durable commit): an operation that raised may have committed. Faults it cannot
raise go to sys.unraisablehook, where ``quiet_injected_faults()`` drops them. Limitations: files are
held in memory; a failed fsync leaves its data pending (Linux may drop it); xShm*, locks and file
controls pass through and are never faulted; ``subset`` picks directory entries independently (a
real file system may keep a rename's two halves together).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import sys
import threading

import apsw

from raft_sqlite import fsio

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


def _os_fail(code: int, why: str) -> OSError:
    """The OSError ``vfs.fs`` raises for an injected fault (ENOSPC for SQLITE_FULL, else EIO)."""
    en = errno.ENOSPC if code == apsw.SQLITE_FULL else errno.EIO
    exc = OSError(en, f"faultvfs: {why}")
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


def apply_pending(durable: bytes, pending: list) -> bytes:
    """The content of a file after its pending ops (see :meth:`FaultVFS.file_state`)."""
    return bytes(_apply(bytearray(durable), pending))


class _State:
    """One file of the model (an inode): its durable content plus the pending ops since its last sync.
    ``fresh``: created by SQLite and never synced (absent from every image: the unix VFS rule)."""

    __slots__ = ("durable", "pending", "fresh")

    def __init__(self, durable: bytes = b"", fresh: bool = False) -> None:
        self.durable = bytes(durable)  # immutable: crash snapshots share it instead of copying it
        self.pending: list = []  # (offset, bytes) for a write, (size, None) for a truncate
        self.fresh = fresh

    def sync(self) -> None:
        if self.pending:
            self.durable = bytes(_apply(bytearray(self.durable), self.pending))
        self.pending = []


#: file types whose creation the unix VFS makes durable with a directory fsync at their first sync
_DIRSYNC_TYPES = apsw.SQLITE_OPEN_MAIN_JOURNAL | apsw.SQLITE_OPEN_WAL | apsw.SQLITE_OPEN_SUPER_JOURNAL


class _Dir:
    """One directory of the model: current entries (what the kernel shows now), durable entries (what
    a power cut keeps: the entries at its last ``sync_dir``) and ``seen`` (names the model has met:
    the others are imported from the disk, as durable, when first looked up)."""

    __slots__ = ("cur", "dur", "seen")

    def __init__(self) -> None:
        self.cur: dict[str, _State | _Dir] = {}
        self.dur: dict[str, _State | _Dir] = {}
        self.seen: set[str] = set()


def _copy(node, memo: dict):
    """Deep copy of a model node (one copy per node even when it has several names)."""
    got = memo.get(id(node))
    if got is not None:
        return got
    if isinstance(node, _State):
        new = _State(node.durable, node.fresh)
        new.pending = list(node.pending)
    else:
        new = _Dir()
        memo[id(node)] = new
        new.cur = {k: _copy(v, memo) for k, v in node.cur.items()}
        new.dur = {k: _copy(v, memo) for k, v in node.dur.items()}
        new.seen = set(node.seen)
    memo[id(node)] = new
    return new


class _File(apsw.VFSFile):
    """A tracked file: passes I/O to the base VFS and records it in its ``_State``."""

    def __init__(self, vfs: FaultVFS, name, flags, state: _State, parent: _Dir, entry: str) -> None:
        super().__init__(vfs.base, name, flags)
        self._vfs, self._st, self._parent, self._entry = vfs, state, parent, entry

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
            st.sync()
            if st.fresh:  # first sync of a journal/WAL SQLite created: the unix VFS fsyncs its directory,
                st.fresh = False  # which makes the directory's whole current state durable
                self._parent.dur = dict(self._parent.cur)


class FaultVFS(apsw.VFS):
    """Fault-injecting VFS registered with apsw as ``name``, inheriting from VFS ``base``.

    ``root``: only files under this directory are tracked and faulted (default:
    every named, non-temporary file opened through this VFS or ``fs``); what exists under it
    when the VFS is made is durable as found and part of every image. Temporary files
    are always passed through untouched. ``counters``: writes/syncs/truncates
    attempted on tracked files. ``fs``: the :class:`FaultFS` sharing this model (install it
    with ``raft_sqlite.fsio.installed(vfs.fs)``). Keep a reference: apsw unregisters a collected VFS.
    """

    def __init__(self, name: str = "fault", base: str = "", root: str | None = None) -> None:
        super().__init__(name, base)
        self.name, self.base = name, base
        self.root = os.path.realpath(root) if root is not None else None
        self._lock = threading.RLock()
        self._top = _Dir()  # the directory ``root`` (or "/")
        self.counters = {k + "s": 0 for k in _KINDS}  # calls attempted on tracked files
        self.crashed = False
        self._frozen: _Dir | None = None
        self._crash: list | None = None  # [kind, calls left]
        self._errors: dict[str, list] = {}  # kind -> [calls left, exception, sticky]
        self.fs = FaultFS(self)
        if self.root is not None and os.path.isdir(self.root):
            # everything already under root is durable as found, and in every image even if never touched
            self._import_tree(self._top, self.root)

    def filesystem(self) -> FaultFS:
        """The :mod:`raft_sqlite.fsio` backend sharing this VFS's model and fault arming (``self.fs``)."""
        return self.fs

    def arm_crash(self, at_sync: int | None = None, at_write: int | None = None) -> None:
        """Lose power at the ``at_sync``-th sync (or ``at_write``-th write) from now, 1-based; SQLite's
        xSync/xWrite and ``fs``'s fsync/fdatasync/sync_dir (write/pwrite) both count."""
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

    # ------------------------------------------------------------------------------------ the model
    def tracked(self, path: str | os.PathLike) -> str | None:
        """The real path of ``path`` if it is under ``root`` (always, without a root), else None."""
        real = os.path.realpath(path)
        if self.root and os.path.commonpath([self.root, real]) != self.root:
            return None
        return real

    def _parts(self, real: str) -> list[str]:
        rel = os.path.relpath(real, self.root or "/")
        return [] if rel == "." else rel.split(os.sep)

    def _import(self, d: _Dir, name: str, disk: str):
        """Model the existing disk object ``disk`` as entry ``name`` of ``d``, durable as found."""
        d.seen.add(name)
        try:
            st = os.lstat(disk)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            node = _Dir()
        elif stat.S_ISREG(st.st_mode) and not name.endswith("-shm"):
            with open(disk, "rb") as f:
                node = _State(f.read())
        else:
            return None
        d.cur[name] = d.dur[name] = node
        return node

    def _child(self, d: _Dir, name: str, disk: str):
        if name not in d.seen:
            return self._import(d, name, disk)
        return d.cur.get(name)

    def _parent(self, real: str) -> tuple[_Dir | None, str]:
        """(model of the directory holding ``real``, its entry name); None if that directory does not
        exist. Lock held."""
        parts = self._parts(real)
        d, disk = self._top, self.root or "/"
        for p in parts[:-1]:
            disk = os.path.join(disk, p)
            d = self._child(d, p, disk)
            if not isinstance(d, _Dir):
                return None, parts[-1] if parts else ""
        return d, parts[-1] if parts else ""

    def _entry(self, real: str | None, *, tree: bool = False) -> tuple[_Dir | None, str, object]:
        """(model of the directory holding ``real``, its entry name, model of ``real`` or None) for a tracked
        path; ``(None, "", None)`` for an untracked one (None) or one whose directory does not exist. With
        ``tree``, a directory's whole subtree is modelled first (before it is renamed or removed). Lock held."""
        if not real:
            return None, "", None
        parent, entry = self._parent(real)
        node = self._child(parent, entry, real) if parent is not None else None
        if tree and isinstance(node, _Dir):
            self._import_tree(node, real)
        return parent, entry, node

    def _lookup(self, real: str):
        if real == (self.root or "/"):
            return self._top
        d, name = self._parent(real)
        return None if d is None else self._child(d, name, real)

    def _import_tree(self, d: _Dir, disk: str) -> None:
        """Model every not yet seen entry under directory ``d`` (before it is renamed or removed)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(disk):
                node = self._child(d, name, os.path.join(disk, name))
                if isinstance(node, _Dir):
                    self._import_tree(node, os.path.join(disk, name))

    def file_state(self, path: str) -> tuple[bytes, list] | None:
        """(durable content, pending ops) of the file now at ``path`` in the model (frozen at the crash
        point after a crash), or None if the model has no file there. Pending ops are ``(offset, bytes)``
        writes and ``(size, None)`` truncates, oldest first; ``apply_pending`` replays them."""
        real = self.tracked(path)
        if real is None:
            return None
        with self._lock:
            top = self._frozen if self.crashed else self._top
            node, parts = top, self._parts(real)
            for p in parts:
                node = node.cur.get(p) if isinstance(node, _Dir) else None
            if not isinstance(node, _State):
                return None
            return bytes(node.durable), list(node.pending)

    # ------------------------------------------------------------------------------------ crash images
    def write_crash_image(self, target_dir: str, mode: str = "lose", seed: int = 0) -> list[str]:
        """Write what reached the disk into ``target_dir`` and return the paths of the files written.

        Uses the state frozen at the crash point, or the current state if no crash happened. Files
        and directories keep their names relative to ``root`` (without a root: files are written
        under their basename); names of the model absent from the image, and every ``*-shm`` beside
        a file written, are removed from ``target_dir``.
        """
        if mode not in MODES:
            raise ValueError(f"bad mode {mode!r}")
        with self._lock:
            top = self._frozen if self.crashed else _copy(self._top, {})
        rng = random.Random(seed)
        files: list[tuple[str, bytes | None]] = []  # (relative name, content or None: absent)
        gone: list[str] = []  # directories of the model absent from the image
        dirs: list[str] = []  # directories present in the image (created even when empty)

        def walk(d: _Dir, rel: str) -> None:
            for name in sorted(set(d.cur) | set(d.dur)):
                old, new = d.dur.get(name), d.cur.get(name)
                if isinstance(new, _State) and new.fresh:
                    new = None  # SQLite created it and never synced it: absent (unix VFS rule)
                node = old if mode == "lose" or old is new else rng.choice((old, new))
                sub = os.path.join(rel, name)
                if isinstance(node, _Dir):
                    if self.root:
                        dirs.append(sub)
                    walk(node, sub)
                elif node is not None:
                    content = self._image(bytes(node.durable), node.pending, mode, rng)
                    files.append((sub if self.root else name, content))
                elif self.root:  # absent: remove what a previous image may have left there
                    if isinstance(old or new, _Dir):
                        gone.append(sub)
                    else:
                        files.append((sub, None))
                elif isinstance(old or new, _State):
                    files.append((name, None))

        walk(top, "")
        names = [n for n, c in files if c is not None]
        if len(set(names)) < len(names):
            raise ValueError(f"clashing file names {sorted(names)}")
        os.makedirs(target_dir, exist_ok=True)
        for rel in gone:
            shutil.rmtree(os.path.join(target_dir, rel), ignore_errors=True)
        for rel in dirs:
            if not os.path.isdir(os.path.join(target_dir, rel)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(target_dir, rel))
                os.makedirs(os.path.join(target_dir, rel))
        written = []
        for rel, content in files:
            if content is None and rel in names:
                continue  # without a root: another tracked file of that basename is written
            dst = os.path.join(target_dir, rel)
            for stale in (dst, dst + "-shm"):
                if os.path.isdir(stale) and not os.path.islink(stale):
                    shutil.rmtree(stale)
                elif os.path.lexists(stale):
                    os.remove(stale)
            if content is None:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(content)
            written.append(dst)
        return written

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

    def _event(self, kind: str, os_error: bool = False) -> None:
        """Count a ``kind`` call on a tracked file; raise if it must crash or fail (an apsw error, or
        with ``os_error`` the OSError ``fs`` raises). Lock held."""
        fail = _os_fail if os_error else _fail
        if self.crashed:
            raise fail(_IOERR[kind], f"{kind} after power loss")
        self.counters[kind + "s"] += 1
        if self._crash and self._crash[0] == kind:
            self._crash[1] -= 1
            if self._crash[1] == 0:
                self._frozen, self.crashed, self._crash = _copy(self._top, {}), True, None
                raise fail(_IOERR[kind], f"power lost at this {kind}")
        err = self._errors.get(kind)
        if err:
            err[0] -= 1
            if err[0] <= 0:
                if not err[2]:
                    del self._errors[kind]
                raise fail(err[1], f"injected {kind} error")

    def _tracked(self, path: str | None, flags: int) -> str | None:
        if path is None or flags & apsw.SQLITE_OPEN_DELETEONCLOSE:
            return None
        return self.tracked(path)

    def xOpen(self, name, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        real = self._tracked(path, flags[0])
        if real is None:
            return apsw.VFSFile(self.base, name, flags)
        if self.crashed:
            raise _fail(_IOERR["open"], "open after power loss")
        with self._lock:
            parent, entry = self._parent(real)
            if parent is None:  # no such directory: let the base VFS fail
                return apsw.VFSFile(self.base, name, flags)
            state = self._child(parent, entry, real)
            if not isinstance(state, _State):
                # the unix VFS fsyncs the directory at the first sync only of the journals and WALs it
                # creates (unixOpen's syncDir), never of a database file: that entry needs a sync_dir
                state = _State(fresh=bool(flags[0] & _DIRSYNC_TYPES))
                parent.cur[entry] = state
                parent.seen.add(entry)
        return _File(self, name, flags, state, parent, entry)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        real = self._tracked(filename, 0)
        if real is not None and self.crashed:
            raise _fail(_IOERR["delete"], "delete after power loss")
        super().xDelete(filename, syncdir)
        if real is not None:
            with self._lock:
                parent, entry = self._parent(real)
                if parent is not None:
                    # durable only if SQLite asked for a directory sync (EXTRA's journal delete), else at
                    # the directory's next sync: until then a power cut can bring the file back (with
                    # synchronous=FULL a deleted DELETE-mode journal may reappear as a hot journal)
                    parent.cur.pop(entry, None)
                    if syncdir:
                        parent.dur = dict(parent.cur)
                    parent.seen.add(entry)


class FaultFS(fsio.OsFileSystem):
    """The :mod:`raft_sqlite.fsio` backend of a :class:`FaultVFS`: operations on paths under the VFS's
    ``root`` go to the real file system *and* into the VFS's model (same files, same crash and error
    arming, same counters); other paths pass through untouched. See the module docstring for the
    rules (sector tearing of unsynced writes, the dir-entry rule)."""

    def __init__(self, vfs: FaultVFS) -> None:
        self.vfs = vfs
        self._fds: dict[int, tuple[_State, bool]] = {}  # tracked fd -> (file, O_APPEND)

    def _check(self, real: str | None, what: str) -> None:
        if real is not None and self.vfs.crashed:
            raise _os_fail(_IOERR["open"], f"{what} after power loss")

    def open(self, path, flags, mode=0o600):
        v = self.vfs
        real = v.tracked(path)
        if real is None:
            fd = super().open(path, flags, mode)
            with v._lock:
                self._fds.pop(fd, None)  # a reused descriptor number must not write into a stale model file
            return fd
        with v._lock:
            self._check(real, "open")
            parent, entry, node = v._entry(real)
            fd = super().open(path, flags, mode)
            self._fds.pop(fd, None)
            if parent is None or isinstance(node, _Dir) or os.path.isdir(real):
                return fd  # a directory: nothing to model (sync it with sync_dir)
            if node is None:  # O_CREAT made it: its entry is durable only after sync_dir
                node = parent.cur[entry] = _State()
                parent.seen.add(entry)
            if flags & os.O_TRUNC:
                node.pending.append((0, None))
            self._fds[fd] = (node, bool(flags & os.O_APPEND))
            return fd

    def close(self, fd):
        with self.vfs._lock:
            self._fds.pop(fd, None)
        super().close(fd)  # never fails after a power cut: descriptors must still be released

    def read(self, fd, n):
        if fd in self._fds:
            self._check("", "read")
        return super().read(fd, n)

    def pread(self, fd, n, offset):
        if fd in self._fds:
            self._check("", "read")
        return super().pread(fd, n, offset)

    def _write(self, fd, data, offset):
        v = self.vfs
        with v._lock:
            got = self._fds.get(fd)
            if got is None:
                return super().write(fd, data) if offset is None else super().pwrite(fd, data, offset)
            node, append = got
            v._event("write", os_error=True)
            if offset is None:
                at = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
                n = super().write(fd, data)
            else:
                at, n = offset, super().pwrite(fd, data, offset)
            node.pending.append((at, bytes(memoryview(data)[:n])))
            return n

    def write(self, fd, data):
        return self._write(fd, data, None)

    def pwrite(self, fd, data, offset):
        return self._write(fd, data, offset)

    def _fd_op(self, fd, kind, real_op, model_op):
        """A truncate or sync of ``fd``: counted (and possibly crashed) as ``kind`` if the file is tracked,
        done for real, then applied to the model file by ``model_op(state)``."""
        v = self.vfs
        with v._lock:
            got = self._fds.get(fd)
            if got is not None:
                v._event(kind, os_error=True)
            real_op(fd)
            if got is not None:
                model_op(got[0])

    def ftruncate(self, fd, size):
        self._fd_op(fd, "truncate", lambda f: super(FaultFS, self).ftruncate(f, size),
                    lambda st: st.pending.append((size, None)))

    def fsync(self, fd):
        self._fd_op(fd, "sync", super().fsync, _State.sync)

    def fdatasync(self, fd):
        self._fd_op(fd, "sync", super().fdatasync, _State.sync)

    def sync_dir(self, path):
        v = self.vfs
        real = v.tracked(path)
        with v._lock:
            node = v._lookup(real) if real is not None else None
            if isinstance(node, _Dir):
                v._event("sync", os_error=True)
            else:
                self._check(real, "sync_dir")
            super().sync_dir(path)
            if isinstance(node, _Dir):
                node.dur = dict(node.cur)

    def _move(self, src, dst, real_op):
        v = self.vfs
        rs, rd = v.tracked(src), v.tracked(dst)
        with v._lock:
            self._check(rs or rd, "rename")
            sp, sn, node = v._entry(rs, tree=True)
            dp, dn, _ = v._entry(rd)  # the entry it replaces, if any, is known before it goes
            real_op(src, dst)
            if sp is not None:
                sp.cur.pop(sn, None)
            if dp is not None:
                if node is None:  # moved in from outside the model: its entry is durable only after sync_dir
                    kept = dp.dur.get(dn)
                    dp.seen.discard(dn)
                    dp.cur.pop(dn, None)
                    v._child(dp, dn, rd)
                    dp.dur.pop(dn, None)
                    if kept is not None:
                        dp.dur[dn] = kept
                else:
                    dp.cur[dn] = node
                    dp.seen.add(dn)

    def rename(self, src, dst):
        self._move(src, dst, super().rename)

    def replace(self, src, dst):
        self._move(src, dst, super().replace)

    def _remove(self, path, real_op):
        v = self.vfs
        real = v.tracked(path)
        with v._lock:
            self._check(real, "remove")
            parent, entry, _ = v._entry(real, tree=True)
            real_op()
            if parent is not None:
                parent.cur.pop(entry, None)

    def unlink(self, path):
        self._remove(path, lambda: super(FaultFS, self).unlink(path))

    def rmtree(self, path, ignore_errors=False):
        self._remove(path, lambda: super(FaultFS, self).rmtree(path, ignore_errors))

    def mkdir(self, path, mode=0o700):
        v = self.vfs
        real = v.tracked(path)
        with v._lock:
            self._check(real, "mkdir")
            parent, entry, _ = v._entry(real)
            super().mkdir(path, mode)
            if parent is not None:
                parent.cur[entry] = _Dir()
                parent.seen.add(entry)

    def makedirs(self, path, mode=0o700, exist_ok=False):
        head, tail = os.path.split(os.path.abspath(path))
        if tail and head and not os.path.exists(head):
            self.makedirs(head, mode, exist_ok=True)
        try:
            self.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok or not os.path.isdir(path):
                raise
