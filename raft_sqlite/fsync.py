"""Fsync modes and the pragmas they map to: configuration as data (one table, read by the code,
written into the ``settings`` table of every store and printed by ``raft-sqlite status``)."""

from __future__ import annotations

import enum
from typing import TypedDict


class FsyncMode(str, enum.Enum):
    """How durable a write is when the call that made it returns (see :data:`FSYNC_MODES`)."""

    OFF = "OFF"
    NORMAL = "NORMAL"
    FULL = "FULL"
    EXTRA = "EXTRA"


#: Pragmas every connection gets, whatever the mode. The WAL is kept small and reused: a commit
#: whose fdatasync extends the WAL file costs about twice one that overwrites it, so there is no
#: ``journal_size_limit`` (it would shrink the WAL below its working size) and the WAL file persists
#: across opens (SQLITE_FCNTL_PERSIST_WAL).
COMMON_PRAGMAS: dict[str, str] = {
    "journal_mode": "WAL",
    "wal_autocheckpoint": "1000",
    "cache_size": "-32768",
    "temp_store": "MEMORY",
}

#: Pragmas of the ``chunks.db`` connections, applied after the above (chunks.db has 64 KiB pages, so
#: SQLite's default of 1000 pages would let its WAL reach 64 MiB). A checkpoint writes every page it
#: copies into the page cache and syncs them at its end: 64 MiB of dirty data reaching the disk at once,
#: and a commit of raft.db that syncs meanwhile waits behind it (measured, 512 MiB snapshot against
#: single FULL appends: worst append 44-62 ms, Dirty + Writeback peaking at 65 MiB). Checkpointing every
#: 16 pages (1 MiB), with the snapshot writer committing about 1 MiB per transaction, keeps what waits
#: for the disk at about 2 MiB: worst append 9-20 ms in the same runs, at the same snapshot speed (the
#: p99 stays where it was without the governor; see README, "Background work and the log's tail").
#: ``cache_size``: chunk pages are written once and read once, so a big page cache only costs memory.
CHUNKS_PRAGMAS: dict[str, str] = {
    "wal_autocheckpoint": "16",
    "cache_size": "-2048",
}


class FsyncModeSpec(TypedDict):
    """One row of :data:`FSYNC_MODES`."""

    pragmas: dict[str, str]
    interval_sync: bool
    dir_sync: bool
    guarantee: str


#: mode -> (pragmas, periodic WAL sync, fsync data_dir on create/rename/remove, guarantee). Every mode but
#: OFF also fsyncs data_dir and its ancestor directories when a store is created (store creation; without it a power
#: cut could lose the whole data_dir with every acknowledged write: found by the creation campaign).
FSYNC_MODES: dict[FsyncMode, FsyncModeSpec] = {
    FsyncMode.OFF: {
        "pragmas": {"synchronous": "OFF", "fullfsync": "OFF", "checkpoint_fullfsync": "OFF"},
        "interval_sync": False, "dir_sync": False,
        "guarantee": "survives a process crash; power loss may lose recent writes (tests only)",
    },
    FsyncMode.NORMAL: {
        "pragmas": {"synchronous": "NORMAL", "fullfsync": "OFF", "checkpoint_fullfsync": "OFF"},
        "interval_sync": True, "dir_sync": False,
        "guarantee": "survives a process crash; power loss loses at most one fsync_interval",
    },
    FsyncMode.FULL: {
        "pragmas": {"synchronous": "FULL", "fullfsync": "OFF", "checkpoint_fullfsync": "OFF"},
        "interval_sync": False, "dir_sync": False,
        "guarantee": "survives power loss",
    },
    FsyncMode.EXTRA: {
        "pragmas": {"synchronous": "EXTRA", "fullfsync": "ON", "checkpoint_fullfsync": "ON"},
        "interval_sync": False, "dir_sync": True,
        "guarantee": "as FULL, plus an fsync of data_dir after later files are created, renamed or removed",
    },
}

#: PRAGMA synchronous reads back as a number.
SYNCHRONOUS_LEVELS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


def pragmas_for(mode: FsyncMode) -> dict[str, str]:
    """All pragmas (common + mode specific) applied to a store's connections, in order."""
    return {**COMMON_PRAGMAS, **FSYNC_MODES[FsyncMode(mode)]["pragmas"]}
