"""The manifest of a snapshot: its kind, its metadata (:class:`SnapshotMeta`, one row of ``raft.db``'s
``snapshots`` table), the CRC32 that row carries, and the check that a manifest object given to a public
call is one the store can hold."""

from __future__ import annotations

import enum
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import apsw

from .. import layout
from ..args import int_arg
from ..errors import CorruptionError


class SnapshotKind(str, enum.Enum):
    """FULL: self-contained. DELTA: only what changed since its parent (see :class:`SnapshotChain`)."""

    FULL = "FULL"
    DELTA = "DELTA"


def manifest_fields_crc(sid: int, gid: int, index: int, term: int, kind: str, parent_id: int | None, status: str,
                        size: int | None, chunk_count: int | None, checksum: str | None, structures: str | None,
                        source: str) -> int:
    """CRC32 stored with a manifest row, over every field that describes the snapshot."""
    text = f"{sid}|{gid}|{index}|{term}|{kind}|{parent_id}|{status}|{size}|{chunk_count}|{checksum}|" \
           f"{structures}|{source}"
    return zlib.crc32(text.encode())


def manifest_crc(conn: apsw.Connection, sid: int) -> int | None:
    """The CRC32 the manifest row ``sid`` should carry, computed from its fields as stored (read on
    the apsw connection ``conn`` to raft.db); None if there is no such row. Compare with its
    ``crc32`` column (set when the snapshot became DURABLE)."""
    row = conn.execute("SELECT snapshot_id, group_id, idx, term, kind, parent_id, status, size, chunk_count, "
                       "checksum, structures, source FROM snapshots WHERE snapshot_id=?", (sid,)).fetchone()
    return None if row is None else manifest_fields_crc(*row)


#: The columns of a manifest row, in the order :func:`meta_from_row` takes them.
MANIFEST_COLUMNS = ("snapshot_id, group_id, idx, term, kind, parent_id, status, size, chunk_count, checksum, "
                    "structures, created_at, finished_at, crc32, source")


@dataclass(frozen=True)
class SnapshotMeta:
    """The manifest of one snapshot.

    ``id`` is unique within the node. ``index``/``term`` are the last log entry the snapshot covers.
    ``size`` is its length in bytes (for a WRITING install: the bytes durably received so far).
    ``parent_id`` names the snapshot a DELTA applies on (None for FULL). ``checksum`` is the sha256 hex
    digest of the whole byte stream. ``structures`` is the per-structure table written by
    :class:`~raft_sqlite.statemachine.StateMachineSnapshotManager` (None for raw snapshots).
    ``source`` is ``"local"`` or ``"install"`` (received from a leader).
    """

    id: int
    group: str
    index: int
    term: int
    kind: SnapshotKind
    size: int
    parent_id: int | None = None
    status: str = "DURABLE"
    chunk_count: int = 0
    checksum: str | None = None
    structures: Any = field(default=None, compare=False)
    source: str = "local"
    created_at: float = 0.0
    finished_at: float | None = None


def meta_from_row(row: Any, group: str, where: str) -> SnapshotMeta:
    """The :class:`SnapshotMeta` of one manifest row (the :data:`MANIFEST_COLUMNS` of ``raft.db``'s
    ``snapshots``, as apsw returns them) of group ``group``. A DURABLE row must carry the CRC32 of its
    fields, else :class:`~raft_sqlite.errors.CorruptionError` (its message starts with ``where``)."""
    (sid, gid, idx, term, kind, parent, status, size, count, checksum, structures, created, finished, crc,
     source) = row
    if status == "DURABLE" and manifest_fields_crc(sid, gid, idx, term, kind, parent, status, size, count, checksum,
                                                   structures, source) != crc:
        raise CorruptionError(f"{where}: group {group!r}: snapshot {sid} manifest fails its CRC check")
    try:
        return SnapshotMeta(sid, group, idx, term, SnapshotKind(kind), size, parent, status, count, checksum,
                            json.loads(structures) if structures else None, source, created, finished)
    except ValueError as exc:  # a kind or a structures table that is not one (only a WRITING row is unchecked)
        raise CorruptionError(f"{where}: group {group!r}: snapshot {sid} manifest is malformed ({exc})") from None


def meta_arg(name: str, meta: object) -> SnapshotMeta:
    """``meta`` if it is a :class:`SnapshotMeta` whose id and index are integers the store can hold
    (TypeError/ValueError otherwise): a hand-made manifest object must not reach SQL."""
    if not isinstance(meta, SnapshotMeta):
        raise TypeError(f"{name} must be a SnapshotMeta, not {type(meta).__name__}")
    int_arg(f"{name}.id", meta.id, layout.MIN_INT64, layout.MAX_INT64)
    int_arg(f"{name}.index", meta.index, layout.MIN_INT64, layout.MAX_INT64)
    return meta

