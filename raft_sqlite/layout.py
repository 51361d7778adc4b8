"""The on-disk layout of a node's data_dir, as constants: file names, data format version, the alembic
head revisions this code knows, and the log key layout. Kept apart from :mod:`raft_sqlite.schema` so that
opening a store does not import SQLAlchemy (it is only needed when a migration runs)."""

#: Data format written into the node record. A store whose format is newer is refused.
FORMAT_VERSION = 1
#: alembic head revisions this code knows (checked against the migrations by the tests).
MAIN_HEAD = "0005_main_close_digest_spans"
CHUNKS_HEAD = "0001_chunks"
MAIN_DB = "raft.db"
CHUNKS_DB = "chunks.db"
#: the data_dir lock file (flock, holder record inside): see :mod:`raft_sqlite.lock`. Never backed up.
LOCK_FILE = "raft.lock"
#: the gc pin (flock): held by whoever deletes snapshot chunks, and briefly by a backup taken from another
#: process while it pins its read snapshots (see :class:`raft_sqlite.lock.GcLock`). Never backed up.
GC_LOCK_FILE = "raft.gc.lock"
#: log key = group_id * KEY_SPAN + index: one b-tree, no secondary index on the append path.
KEY_SHIFT = 40
KEY_SPAN = 1 << KEY_SHIFT
#: snapshot chunk key = snapshot_id * CHUNK_SEQ_SPAN + seq (chunks.db's ``snapshot_chunks.key``): the
#: chunks of one snapshot are one key range, so reading, deleting and listing them are range scans.
CHUNK_SEQ_SPAN = 1 << 32
#: page size of chunks.db (set when the file is created; raft.db keeps SQLite's 4 KiB)
CHUNKS_PAGE_SIZE = 65536

# ---- integer ranges the storage can hold (every public call checks its integers against these up front)
#: SQLite INTEGER is a signed 64-bit value.
MIN_INT64 = -(1 << 63)
MAX_INT64 = (1 << 63) - 1
#: Highest log/snapshot/commit index: one group's keys span KEY_SPAN values (an index of KEY_SPAN
#: would be a key of the next group).
MAX_INDEX = KEY_SPAN - 1
#: Highest term (stored as a signed 64-bit INTEGER; terms are >= 0).
MAX_TERM = MAX_INT64
#: Range of an int ``voted_for`` (any signed 64-bit value).
MIN_INT_VOTE, MAX_INT_VOTE = MIN_INT64, MAX_INT64
#: Upper bound of byte counts given as arguments (``max_bytes``, chunk/commit sizes, segment bytes).
MAX_SIZE = MAX_INT64
#: Bounds of ``NodeStore.open(fsync_interval=...)`` in seconds (NORMAL mode's WAL sync period): above
#: zero (0 would spin the sync thread) and at most one hour (a longer window of power-loss exposure
#: is almost certainly a unit mistake).
MIN_FSYNC_INTERVAL = 0.0001
MAX_FSYNC_INTERVAL = 3600.0
#: A pre-allocated file of DISK_RESERVE_BYTES in data_dir that holds no data: when a full disk makes
#: the writes of opening a store fail (a snapshot filled it), open deletes it and retries, so the
#: store can drop the partial snapshot and give its space back (see :mod:`raft_sqlite.reserve`).
RESERVE_FILE = "disk-reserve"
#: Content of the placeholder ``raft.db`` a restore writes into its target before anything else: not a
#: SQLite file, so until the restored raft.db replaces it (the restore's last step) the target is refused
#: by ``NodeStore.open`` instead of opening as a half-restored or brand-new node, and a repeated restore
#: recognises the target as its own interrupted work.
RESTORE_PLACEHOLDER = (b"raft_sqlite: a restore into this data_dir was interrupted (or is running): this is not a "
                       b"store. Run the restore again into the same data_dir; it removes these leftovers.\n")
#: Temporary names a restore creates in its target (``.raft.db.restoring``, its journal, the
#: placeholder's temporary): leftovers of an interrupted restore (regular expression).
RESTORE_TEMP_PATTERN = r"^\.(raft\.db|chunks\.db)\.(restoring(-journal)?|tmp)$"
DISK_RESERVE_BYTES = 1 << 20
