"""Snapshots of a state machine made of named data structures: ``store.state_machine(group)``.

A *structure* is any object with

* ``snapshot() -> bytes``: its whole state;
* ``restore(data: bytes)``: replace its state with ``data`` (from ``snapshot()``);
* optionally ``delta() -> bytes | None``: what changed since its last ``snapshot()``/``delta()``/
  ``restore()``/``apply_delta()`` (None asks for a full one), and ``apply_delta(data: bytes)``.

Each of those calls restarts the structure's change tracking from its current state.

A *streaming* structure (one whose state is too big for one ``bytes``, e.g. the SQL state database of
:mod:`raft_sqlite.sqlstate`) has instead

* ``snapshot_into(write, index, term)``: call ``write(piece)`` with its whole state at ``index``/``term``;
* ``restore_from(read, length, index, term)``: replace its state with the ``length`` bytes ``read(n)``
  returns (the blob's sha256 is checked before its last byte is returned);
* optionally ``delta_into(write, index, term) -> bool`` (False, having written nothing: store it whole)
  and ``apply_delta_from(read, length, index, term)``.

Stream format of one snapshot: the structures' blobs one after the other (each written and dropped
before the next is asked for, so memory holds one structure at a time), then a trailer: the JSON table
``{"format": 1, "kind", "index", "term", "structures": [{"name", "mode": "full"|"delta", "offset",
"length", "sha256"}]}``, its length (``<I``) and the magic ``RSSMTBL1``. The table is also stored in the
manifest's ``structures`` column; the trailer makes the stream self-describing, which is what an
InstallSnapshot needs (a leader streams the bytes, the follower checks the table before accepting).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from typing import Any, Protocol

from .errors import CorruptionError, SnapshotError
from .snapshot import (
    SnapshotChain,
    SnapshotKind,
    SnapshotManager,
    SnapshotMeta,
    SnapshotReader,
    SnapshotWriter,
)

log = logging.getLogger("raft_sqlite.statemachine")

MAGIC = b"RSSMTBL1"
_TRAILER = struct.Struct("<I8s")
FORMAT = 1

#: The structure table of one snapshot (JSON, see the module docstring).
Table = dict[str, Any]


class Structure(Protocol):
    """What :meth:`StateMachineSnapshotManager.register` needs of a structure. ``delta() -> bytes | None``
    and ``apply_delta(data: bytes) -> None`` are optional (both or neither) and found by ``getattr``."""

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class SeekableReader(Protocol):
    """A seekable binary stream (a :class:`~raft_sqlite.snapshot.SnapshotReader`, an ``io.BytesIO``)."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes: ...


class StructureMismatchError(SnapshotError):
    """A snapshot's structures differ from the registered ones (a registered structure is missing
    from it, or it holds one that is not registered). A configuration error, never corruption:
    :meth:`StateMachineSnapshotManager.restore` raises it at once instead of trying older chains."""


class StructureTableError(CorruptionError):
    """A state-machine snapshot's bytes verify, but its structure table does not: the trailer differs
    from the manifest's table or names another index/term, or a structure fails its sha256
    (:func:`verify_stream`)."""


def read_table(stream: SeekableReader, size: int, where: str) -> Table:
    """Parse the structure table from the trailer of a state-machine snapshot stream of ``size``
    bytes (seekable). Raises :class:`SnapshotError` if the stream is not one."""
    if size < _TRAILER.size:
        raise SnapshotError(f"{where}: not a state-machine snapshot (only {size} bytes)")
    stream.seek(size - _TRAILER.size)
    n, magic = _TRAILER.unpack(stream.read(_TRAILER.size))
    if magic != MAGIC or n > size - _TRAILER.size:
        raise SnapshotError(f"{where}: not a state-machine snapshot (no structure table)")
    stream.seek(size - _TRAILER.size - n)
    try:
        table = json.loads(stream.read(n))
    except ValueError as exc:
        raise SnapshotError(f"{where}: structure table is not valid JSON ({exc})") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("structures"), list):
        raise SnapshotError(f"{where}: unknown structure table format")
    end = 0
    for e in table["structures"]:
        if not isinstance(e, dict) or {"name", "mode", "offset", "length", "sha256"} - set(e) \
                or e["mode"] not in ("full", "delta") or e["offset"] != end:
            raise SnapshotError(f"{where}: malformed structure entry {e!r}")
        end += e["length"]
    if end != size - _TRAILER.size - n:
        raise SnapshotError(f"{where}: structure table does not describe the stream")
    return table


def check_table(table: Table, meta: SnapshotMeta, where: str) -> None:
    """Refuse (:class:`StructureTableError`) a stream's structure table that differs from the manifest's or
    was taken at another index/term than the manifest says."""
    if meta.structures is not None and meta.structures != table:
        raise StructureTableError(f"{where}: structure table in the stream differs from the manifest")
    if (table.get("index"), table.get("term")) != (meta.index, meta.term):
        raise StructureTableError(f"{where}: stream was taken at {table.get('index')}/{table.get('term')}, manifest "
                                  f"says {meta.index}/{meta.term}")


def verify_stream(reader: SnapshotReader, meta: SnapshotMeta, where: str) -> Table:
    """Read the state-machine snapshot ``meta`` through ``reader`` (a fresh :class:`SnapshotReader` of it,
    which checks each chunk's CRC32 and the sha256 of the whole stream) and check its structure table:
    the trailer parses (:func:`read_table`), equals the manifest's table and names the manifest's
    index/term, and every structure's bytes match their sha256. Returns the table. Raises
    :class:`CorruptionError` for damaged bytes, :class:`StructureTableError` when the bytes verify but
    the table does not, :class:`SnapshotError` for a stream that is not a state-machine snapshot;
    messages start with ``where``. Memory: one chunk (structures are hashed as they stream by)."""
    spans = [(e["offset"], e["offset"] + e["length"], hashlib.sha256()) for e in
             (meta.structures or {}).get("structures", [])
             if isinstance(e, dict) and isinstance(e.get("offset"), int) and isinstance(e.get("length"), int)]
    pos = 0
    for data in reader.chunks():
        end = pos + len(data)
        for lo, hi, h in spans:
            if lo < end and hi > pos:
                h.update(data[max(lo, pos) - pos:min(hi, end) - pos])
        pos = end
    table = read_table(reader, meta.size, where)
    check_table(table, meta, where)
    if meta.structures is None:  # the table came from the stream only: hash each structure now (seeking)
        spans = []
        for e in table["structures"]:
            h = hashlib.sha256()
            reader.seek(e["offset"])
            left = e["length"]
            while left > 0:
                piece = reader.read(min(left, 1 << 20))
                if not piece:
                    break
                h.update(piece)
                left -= len(piece)
            spans.append((e["offset"], e["offset"] + e["length"], h))
    for e, (_, _, h) in zip(table["structures"], spans, strict=True):
        if h.hexdigest() != e["sha256"]:
            raise StructureTableError(f"{where}: structure {e['name']!r} fails its sha256 check")
    return table


_PAIRS = (("snapshot", "restore"), ("delta", "apply_delta"))
_STREAM_PAIRS = (("snapshot_into", "restore_from"), ("delta_into", "apply_delta_from"))


def _is_streaming(structure: object) -> bool:
    return callable(getattr(structure, "snapshot_into", None))


class _CheckedBlob:
    """``length`` bytes of a seekable reader from its position, handed out by :meth:`read`; their sha256 is
    checked before the last byte is returned (a structure never receives a whole damaged blob)."""

    def __init__(self, r: SeekableReader, length: int, sha256: str, where: str) -> None:
        self._r, self.left, self._want, self._where = r, length, sha256, where
        self._h = hashlib.sha256()

    def read(self, n: int) -> bytes:
        n = min(int(n), self.left)
        if n <= 0:
            return b""
        data = self._r.read(n)
        if len(data) != n:
            raise CorruptionError(f"{self._where}: the blob ends {self.left - len(data)} bytes early")
        self._h.update(data)
        self.left -= n
        if not self.left and self._h.hexdigest() != self._want:
            raise CorruptionError(f"{self._where}: fails its sha256 check")
        return data


class StateMachineSnapshotManager:
    """Registry of named structures of one group's state machine, and their snapshots.

    :meth:`capture` snapshots every registered structure (FULL or DELTA per the chain policy of
    :class:`~raft_sqlite.snapshot.SnapshotManager`: ``store.snapshots(group).max_chain_length``);
    :meth:`restore` loads the newest valid chain into them; :meth:`install` receives a leader's
    snapshot. Restore and install refuse (:class:`SnapshotError`) a snapshot whose structures differ
    from the registered ones, in either direction: nothing is ever silently skipped.
    """

    def __init__(self, store: Any, group: str):  # the lead types this as Kernel
        self._store = store
        self.group = group
        self.snapshots: SnapshotManager = store.snapshots(group)
        self._structures: dict[str, Structure] = {}
        self._lock = threading.RLock()
        # id of the snapshot the structures' change tracking is relative to (None: unknown, next
        # capture is FULL)
        self._base_id: int | None = None

    # ------------------------------------------------------------ registry
    def register(self, name: str, structure: Structure) -> None:
        """Register ``structure`` under ``name`` (a non-empty str, unique in the group). It must have
        callable ``snapshot`` and ``restore``; ``delta`` and ``apply_delta`` come together or not at
        all. Registering changes what a snapshot must contain, so the next capture is FULL."""
        if not isinstance(name, str) or not name:
            raise TypeError("structure name must be a non-empty str")
        pairs = _STREAM_PAIRS if _is_streaming(structure) else _PAIRS
        for attr in pairs[0]:
            if not callable(getattr(structure, attr, None)):
                raise TypeError(f"structure {name!r} has no callable {attr}()")
        if callable(getattr(structure, pairs[1][0], None)) != callable(getattr(structure, pairs[1][1], None)):
            raise TypeError(f"structure {name!r}: {pairs[1][0]}() and {pairs[1][1]}() come together")
        with self._lock:
            if name in self._structures:
                raise ValueError(f"group {self.group!r}: a structure named {name!r} is already registered")
            self._structures[name] = structure
            self._base_id = None

    def unregister(self, name: str) -> None:
        """Remove the structure ``name`` (KeyError if unknown); the next capture is FULL."""
        with self._lock:
            del self._structures[name]
            self._base_id = None

    def names(self) -> list[str]:
        """Registered structure names, sorted (the order they are written in)."""
        return sorted(self._structures)

    # ------------------------------------------------------------ capture
    def capture(self, index: int, term: int, *, kind: SnapshotKind | None = None) -> SnapshotMeta:
        """Snapshot every registered structure as of log entry ``index``/``term`` and return the
        DURABLE :class:`SnapshotMeta` (preconditions as :meth:`SnapshotManager.write`).

        ``kind`` None follows the chain policy: a DELTA on the newest snapshot when its chain is
        shorter than ``max_chain_length``, when that snapshot is the one the structures' change
        tracking is relative to (captured or restored by this manager) and when it holds the same
        structures; otherwise FULL. ``kind=FULL`` forces a full snapshot (e.g. to stream to a
        follower). In a DELTA, a structure without ``delta()`` or whose ``delta()`` returns None is
        stored whole. If the capture fails, the next one is FULL. Blocks while another thread's
        capture of the group runs; called by a :class:`~raft_sqlite.snapshot.SnapshotScheduler`'s
        capture function (on the scheduler's thread, which holds the group's ``capture_lock``) it is
        that scheduled capture."""
        mgr = self.snapshots
        with mgr.capture_lock, self._lock:
            if not self._structures:
                raise SnapshotError(f"group {self.group!r}: no structure is registered")
            parent: SnapshotMeta | None = None
            want = SnapshotKind(kind) if kind is not None else None
            if want is not SnapshotKind.FULL:
                parent = self.delta_parent(index)
                if parent is None and want is SnapshotKind.DELTA:
                    raise SnapshotError(f"group {self.group!r}: a DELTA is not possible now (no suitable parent)")
            skind = SnapshotKind.DELTA if parent is not None else SnapshotKind.FULL
            self._base_id = None  # until this capture is durable
            w = mgr.write(index, term, kind=skind, parent=parent)
            with w:
                entries = []
                for name in self.names():
                    s = self._structures[name]
                    off = w.offset
                    if _is_streaming(s):
                        mode, digest = self._stream_structure(w, name, s, parent is not None, index, term)
                        entries.append({"name": name, "mode": mode, "offset": off, "length": w.offset - off,
                                        "sha256": digest})
                        continue
                    data: bytes | None = None
                    mode = "full"
                    delta = getattr(s, "delta", None)  # optional (register() checked its apply_delta)
                    if parent is not None and callable(delta):
                        data = delta()
                        mode = "delta"
                    if data is None:
                        data, mode = s.snapshot(), "full"
                    if not isinstance(data, (bytes, bytearray, memoryview)):
                        raise SnapshotError(f"group {self.group!r}: structure {name!r} returned "
                                            f"{type(data).__name__}, not bytes")
                    w.write(data)
                    entries.append({"name": name, "mode": mode, "offset": off, "length": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()})
                    del data
                table = {"format": FORMAT, "kind": skind.value, "index": index, "term": term, "structures": entries}
                raw = json.dumps(table, sort_keys=True).encode()
                w.write(raw)
                w.write(_TRAILER.pack(len(raw), MAGIC))
                w.structures = table
            meta = w.meta
            assert meta is not None, "set by the writer's finish() when the with block ended cleanly"
            self._base_id = meta.id
            return meta

    def forget_tracking(self) -> None:
        """Forget which snapshot the structures' change tracking is relative to: the next capture is FULL
        (a structure whose state was replaced behind a capture's back calls it)."""
        with self._lock:
            self._base_id = None

    def delta_parent(self, index: int) -> SnapshotMeta | None:
        """The snapshot a capture at ``index`` (``kind`` None) would be a DELTA on, or None (it would be FULL):
        the newest snapshot, when the chain policy allows a DELTA on it, it is the one the structures'
        change tracking is relative to, it is not above ``index`` and it holds the registered structures."""
        k, head = self.snapshots.next_kind()
        if k is SnapshotKind.DELTA and head is not None and head.id == self._base_id and head.index <= index \
                and sorted(e["name"] for e in (head.structures or {}).get("structures", [])) == self.names():
            return head
        return None

    def _stream_structure(self, w: SnapshotWriter, name: str, s: Any, delta_ok: bool, index: int,
                          term: int) -> tuple[str, str]:
        """Write streaming structure ``s`` into ``w`` (its delta when ``delta_ok`` and it gives one); returns
        its mode and sha256."""
        h = hashlib.sha256()
        start = w.offset

        def write(piece: bytes) -> None:
            if not isinstance(piece, (bytes, bytearray, memoryview)):
                raise SnapshotError(f"group {self.group!r}: structure {name!r} wrote {type(piece).__name__}, "
                                    "not bytes")
            h.update(piece)
            w.write(piece)

        delta_into = getattr(s, "delta_into", None)
        if delta_ok and callable(delta_into):
            if delta_into(write, index, term):
                return "delta", h.hexdigest()
            if w.offset != start:
                raise SnapshotError(f"group {self.group!r}: structure {name!r} wrote data and then declined a delta")
        s.snapshot_into(write, index, term)
        return "full", h.hexdigest()

    # ------------------------------------------------------------ restore
    def _check_names(self, table: Table, meta: SnapshotMeta) -> None:
        have = [e["name"] for e in table["structures"]]
        reg = set(self._structures)
        missing = sorted(reg - set(have))
        unknown = sorted(set(have) - reg)
        if missing or unknown or len(have) != len(set(have)):
            raise StructureMismatchError(
                f"group {self.group!r}: snapshot {meta.id} (index {meta.index}) does not match the registered "
                f"structures: missing {missing}, unknown {unknown}" + (", duplicated names" if len(have) != len(set(have))
                                                                       else ""))

    def _verified_table(self, meta: SnapshotMeta, first: bool) -> Table:
        """Read ``meta`` completely (CRC per chunk, sha256) and return its checked table."""
        where = f"{self._store.chunks_path}: group {self.group!r}: snapshot {meta.id}"
        with self.snapshots.open(meta) as r:
            for _ in r.chunks():
                pass
            table = read_table(r, meta.size, where)
        check_table(table, meta, where)
        self._check_names(table, meta)
        for e in table["structures"]:
            if e["mode"] == "delta":
                if first:
                    raise SnapshotError(f"{where}: the base of a chain holds a delta for {e['name']!r}")
                s = self._structures[e["name"]]
                want = "apply_delta_from" if _is_streaming(s) else "apply_delta"
                if not callable(getattr(s, want, None)):
                    raise SnapshotError(f"{where}: structure {e['name']!r} has a delta but no {want}()")
        return table

    def restore(self) -> SnapshotMeta | None:
        """Load the newest valid snapshot chain into the registered structures and return the
        chain's newest :class:`SnapshotMeta` (replay the log from its ``index + 1``); None (nothing
        touched) if the group has no snapshot.

        Every snapshot of the chain is verified first (links, CRC32 per chunk, sha256, structure
        table) before any structure is touched; a chain that fails with corruption is skipped for
        the next older one (logged at WARNING). A structure set that differs from the registered one
        raises :class:`StructureMismatchError` (a :class:`SnapshotError`) at once. Then the base is restored and the deltas applied in
        order, each structure blob checked against its sha256. If a structure's ``restore``/
        ``apply_delta`` raises, the structures are left partly restored and the error propagates."""
        mgr = self.snapshots
        with self._lock:
            chains = mgr.chains()
            if not chains:
                return None
            first_err: Exception | None = None
            for ch in chains:
                try:
                    chain = SnapshotChain.load(mgr, ch[-1])
                    tables = [(m, self._verified_table(m, i == 0)) for i, m in enumerate(chain)]
                except StructureMismatchError:
                    raise
                except (CorruptionError, SnapshotError) as exc:
                    log.warning("group %r: snapshot chain ending at %d is unusable: %s", self.group, ch[-1].id, exc)
                    first_err = first_err or exc
                    continue
                self._base_id = None
                for m, table in tables:
                    self._apply(m, table)
                self._base_id = chain.head.id
                if ch is not chains[0]:
                    log.warning("group %r: restored an older snapshot chain (head %d at index %d)", self.group,
                                chain.head.id, chain.head.index)
                return chain.head
            raise SnapshotError(f"group {self.group!r}: no valid snapshot chain: {first_err}") from first_err

    def _apply(self, meta: SnapshotMeta, table: Table) -> None:
        with self.snapshots.open(meta) as r:
            for e in table["structures"]:
                r.seek(e["offset"])
                s: Any = self._structures[e["name"]]  # a Structure, or a streaming one (found by getattr)
                if _is_streaming(s):
                    blob = _CheckedBlob(r, e["length"], e["sha256"],
                                        f"group {self.group!r}: snapshot {meta.id}: structure {e['name']!r}")
                    if e["mode"] == "full":
                        s.restore_from(blob.read, e["length"], meta.index, meta.term)
                    else:
                        s.apply_delta_from(blob.read, e["length"], meta.index, meta.term)
                    if blob.left:
                        raise SnapshotError(f"group {self.group!r}: snapshot {meta.id}: structure {e['name']!r} "
                                            f"left {blob.left} bytes of its blob unread")
                    continue
                data = r.read(e["length"])
                if len(data) != e["length"] or hashlib.sha256(data).hexdigest() != e["sha256"]:
                    raise CorruptionError(f"group {self.group!r}: snapshot {meta.id}: structure {e['name']!r} "
                                          "fails its sha256 check")
                if e["mode"] == "full":
                    s.restore(data)
                else:
                    # optional, not in the Structure protocol: _verified_table checked it is there
                    s.apply_delta(data)
                del data

    # ------------------------------------------------------------ install
    def install(self, index: int, term: int, *, restore: bool = True) -> SnapshotWriter:
        """A writer for a state-machine snapshot streamed from a leader (see
        :meth:`SnapshotManager.install` for resumption and what happens to the log). The stream must
        be a FULL state-machine snapshot (e.g. the leader's ``capture(..., kind=FULL)`` read with
        ``store.snapshots(group).open(meta)``). Before the install is accepted its structure table
        is checked: a registered structure missing from it, an unknown one in it, or a delta entry
        makes the install fail with :class:`SnapshotError` and nothing of it is kept. After a clean
        finalize the structures are restored from it when ``restore`` is true."""
        where = f"group {self.group!r}: install at {index}"

        def check(w: SnapshotWriter) -> None:
            with w.stream() as r:
                for _ in r.chunks():  # CRC per chunk + sha256 of what was received
                    pass
                table = read_table(r, w.durable_offset, where)
            if (table.get("index"), table.get("term")) != (index, term):
                raise SnapshotError(f"{where}: the stream was taken at {table.get('index')}/{table.get('term')}")
            if table.get("kind") != SnapshotKind.FULL.value or any(e["mode"] != "full" for e in table["structures"]):
                raise SnapshotError(f"{where}: only a FULL state-machine snapshot can be installed")
            assert w.id is not None, "set by begin(), before any chunk can be finalized"
            with self._lock:
                self._check_names(table, SnapshotMeta(w.id, self.group, index, term, SnapshotKind.FULL, w.offset))
            w.structures = table

        w = self.snapshots.install(index, term, before_finalize=check)
        if restore:
            orig = w.finish

            def finish() -> SnapshotMeta:
                meta = orig()
                with self._lock:
                    self._base_id = None
                    got = self.restore()
                if got is None or got.id != meta.id:
                    raise SnapshotError(f"{where}: restored snapshot {got and got.id}, not the installed {meta.id}")
                return meta

            # the writer has no after-finish hook: this instance's finish() is wrapped (mypy refuses it)
            w.finish = finish  # type: ignore[method-assign]
        return w

    def __repr__(self) -> str:
        return f"<StateMachineSnapshotManager {self.group!r} structures={self.names()}>"


__all__ = ["FORMAT", "MAGIC", "SeekableReader", "StateMachineSnapshotManager", "Structure",
           "StructureMismatchError", "StructureTableError", "Table", "check_table", "read_table", "verify_stream"]
