"""The Raft log entry types, in a base module that :mod:`raft_sqlite.wal` (the record stream) and
:mod:`raft_sqlite.log` (the Raft log) both import at top level (``raft_sqlite.log`` re-exports them)."""

from __future__ import annotations

import enum
from typing import NamedTuple


class EntryKind(enum.IntEnum):
    """What an entry carries. The store treats every kind alike; Raft layers give them meaning."""

    NORMAL = 0
    CONFIG = 1
    NOOP = 2


#: The stored ``kind`` integer -> its :class:`EntryKind` (an unknown integer is not a key).
KINDS: dict[int, EntryKind] = {int(k): k for k in EntryKind}


class LogEntry(NamedTuple):
    """One Raft log entry. ``data`` is the opaque payload (bytes)."""

    # the field shadows tuple.index(); mypy flags that, but the field name is the public API since the seed
    index: int  # type: ignore[assignment]
    term: int
    data: bytes
    kind: EntryKind = EntryKind.NORMAL
