"""raft_sqlite: durable, transactional, inspectable storage for Raft nodes on WAL-mode SQLite.

Start with :meth:`NodeStore.open`; see README.md for the tour and the guarantees.
"""

from .errors import (BackupError, CompactionError, CorruptionError, LogCompactedError, LogConflictError,
                     LogGapError, LogUnavailableError, MetadataError, NodeIdentityMismatch, RaftSqliteError,
                     RecoveryRefused, SnapshotError, StorageFault)
from .fsync import FSYNC_MODES, FsyncMode
from .log import EntryKind, LogEntry, PersistentRaftLog
from .metadata import HardState, RaftMetadataStore
from .recovery import RECOVERY_POLICIES, RecoveryPolicy, RecoveryReport
from .store import NodeStore
from .wal import SegmentPolicy, WalCompactor, WalReader, WalWriter

__version__ = "0.1.0"

__all__ = [
    "BackupError", "CompactionError", "CorruptionError", "EntryKind", "FSYNC_MODES", "FsyncMode", "HardState",
    "LogCompactedError", "LogConflictError", "LogEntry", "LogGapError", "LogUnavailableError", "MetadataError",
    "NodeIdentityMismatch", "NodeStore", "PersistentRaftLog", "RECOVERY_POLICIES", "RaftMetadataStore",
    "RaftSqliteError", "RecoveryPolicy", "RecoveryReport", "RecoveryRefused", "SegmentPolicy", "SnapshotError",
    "StorageFault", "WalCompactor", "WalReader", "WalWriter", "__version__",
]
