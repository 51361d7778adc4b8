"""raft_sqlite: durable, transactional, inspectable storage for Raft nodes on WAL-mode SQLite.

Start with :meth:`NodeStore.open`; see README.md for the tour and the guarantees. Metrics live in
:mod:`raft_sqlite.metrics` (optional ``prometheus_client``), full validation in :mod:`raft_sqlite.verify`,
the PySyncObj adapter in :mod:`raft_sqlite.integrations.pysyncobj`.
"""

from .backup import (
                     BackupBusy,
                     BackupCancelled,
                     BackupInfo,
                     DrillReport,
                     HotBackupManager,
                     HotBackupScheduler,
                     LiveSource,
                     RestoreInfo,
                     drill,
                     list_backups,
                     restore,
                     verify_backup,
)
from .errors import (
                     BackupCorrupt,
                     BackupError,
                     CompactionError,
                     CorruptionError,
                     DataDirError,
                     DataDirLocked,
                     GroupNotFoundError,
                     LogCompactedError,
                     LogConflictError,
                     LogGapError,
                     LogUnavailableError,
                     MetadataError,
                     NodeIdentityMismatch,
                     RaftSqliteError,
                     RecoveryRefused,
                     SnapshotError,
                     StorageFault,
)
from .fsync import FSYNC_MODES, FsyncMode
from .log import EntryKind, LogEntry, PersistentRaftLog
from .metadata import HardState, RaftMetadataStore
from .recovery import RECOVERY_POLICIES, RecoveryPolicy, RecoveryReport
from .snapshot import (
                     DeltaSnapshot,
                     SnapshotChain,
                     SnapshotKind,
                     SnapshotManager,
                     SnapshotMeta,
                     SnapshotReader,
                     SnapshotScheduler,
                     SnapshotStore,
                     SnapshotWriter,
)
from .statemachine import StateMachineSnapshotManager, StructureMismatchError
from .store import NodeStore
from .version import __version__
from .wal import SegmentPolicy, WalCompactor, WalReader, WalWriter

__all__ = [
    "BackupBusy", "BackupCancelled", "BackupCorrupt", "BackupError", "BackupInfo", "DrillReport", "CompactionError", "CorruptionError",
    "DataDirError", "DataDirLocked", "DeltaSnapshot", "EntryKind", "FSYNC_MODES", "FsyncMode", "GroupNotFoundError",
    "HardState",
    "HotBackupManager", "HotBackupScheduler", "LiveSource",
    "LogCompactedError", "LogConflictError", "LogEntry", "LogGapError", "LogUnavailableError", "MetadataError",
    "NodeIdentityMismatch", "NodeStore", "PersistentRaftLog", "RECOVERY_POLICIES", "RaftMetadataStore",
    "RaftSqliteError", "RecoveryPolicy", "RecoveryReport", "RecoveryRefused", "RestoreInfo", "SegmentPolicy",
    "SnapshotChain", "SnapshotError", "SnapshotKind", "SnapshotManager", "SnapshotMeta", "SnapshotReader",
    "SnapshotScheduler", "SnapshotStore", "SnapshotWriter", "StateMachineSnapshotManager", "StorageFault",
    "StructureMismatchError", "WalCompactor", "WalReader", "WalWriter", "__version__", "drill", "list_backups", "restore",
    "verify_backup",
]
