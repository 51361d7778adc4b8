"""What an interrupted :func:`raft_sqlite.restore` may have left in a data_dir: the one reading of it.

A restore writes a placeholder ``raft.db`` (:data:`raft_sqlite.layout.RESTORE_PLACEHOLDER`, not a SQLite
file) before anything else and copies the files under temporary names
(:data:`raft_sqlite.layout.RESTORE_TEMP_PATTERN`); the restored ``raft.db`` replaces the placeholder last.
Two callers read that state and must agree on it: ``NodeStore.open`` refuses such a data_dir, and
``restore`` recognises it as its own interrupted work (and removes it) instead of refusing a non-empty
target. Both read it here (this module imports only :mod:`raft_sqlite.layout`, so either can import it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from . import layout

#: The first 16 bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\0"

_TEMP_RE = re.compile(layout.RESTORE_TEMP_PATTERN)


def read_main_head(path: str) -> bytes:
    """The first ``len(RESTORE_PLACEHOLDER)`` bytes of the ``raft.db`` at ``path``; ``b""`` if it does not
    exist or is a directory. Other OSErrors (permissions, I/O) are raised as they are."""
    try:
        with open(path, "rb") as f:
            return f.read(len(layout.RESTORE_PLACEHOLDER))
    except (FileNotFoundError, IsADirectoryError):
        return b""


def is_placeholder(path: str) -> bool:
    """True if the file at ``path`` is a restore's placeholder ``raft.db`` (see :func:`read_main_head`)."""
    return read_main_head(path) == layout.RESTORE_PLACEHOLDER


@dataclass(frozen=True)
class RestoreState:
    """A data_dir as a restore sees it (read by :func:`read_restore_state`)."""

    #: the head of ``raft.db`` (:func:`read_main_head`): b"" when there is none
    head: bytes
    #: names of a restore's temporaries (:data:`~raft_sqlite.layout.RESTORE_TEMP_PATTERN`), sorted
    temporaries: tuple[str, ...]
    #: every other name, sorted (``raft.db`` included; the data_dir lock file excluded)
    others: tuple[str, ...]

    @property
    def placeholder(self) -> bool:
        """``raft.db`` is a restore's placeholder: the restore did not finish (or is running)."""
        return self.head == layout.RESTORE_PLACEHOLDER

    @property
    def main_is_database(self) -> bool:
        """``raft.db`` starts with SQLite's header: a restore's last step (it replacing the placeholder)
        was done, so temporaries beside it are stale, not an interrupted restore."""
        return self.head.startswith(SQLITE_HEADER)

    @property
    def interrupted(self) -> bool:
        """An interrupted restore is there: the placeholder, or temporaries beside a ``raft.db`` that is
        not a database (absent or empty: the restore died before its placeholder was durable)."""
        return self.placeholder or (bool(self.temporaries) and not self.main_is_database)

    def restore_leftovers(self) -> list[str] | None:
        """The names a new restore into this data_dir may remove before it starts: [] if it is empty
        (apart from the lock file); every name if ``raft.db`` is the placeholder (all of it was written
        by the interrupted restore, or by a failed open of it); the temporaries if nothing else is
        there; None if it holds anything else (refused: a restore never overwrites a store)."""
        if self.placeholder:
            return sorted(self.temporaries + self.others)
        if not self.others:
            return list(self.temporaries)
        return None


def read_restore_state(data_dir: str) -> RestoreState:
    """Read ``data_dir``'s ``raft.db`` head, then list its names (the lock file left out). OSError
    (``data_dir`` or ``raft.db`` unreadable, ``data_dir`` missing) is raised as it is: the caller
    decides what it means (``restore`` lets it through, ``NodeStore.open`` makes it a StorageFault)."""
    head = read_main_head(os.path.join(data_dir, layout.MAIN_DB))
    names = [n for n in os.listdir(data_dir) if n not in (layout.LOCK_FILE, layout.GC_LOCK_FILE)]
    return RestoreState(head, tuple(sorted(n for n in names if _TEMP_RE.match(n))),
                        tuple(sorted(n for n in names if not _TEMP_RE.match(n))))
