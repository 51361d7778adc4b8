"""The on-disk layout of a node's data_dir, as constants: file names, data format version, the alembic
head revisions this code knows, and the log key layout. Kept apart from :mod:`raft_sqlite.schema` so that
opening a store does not import SQLAlchemy (it is only needed when a migration runs)."""

#: Data format written into the node record. A store whose format is newer is refused.
FORMAT_VERSION = 1
#: alembic head revisions this code knows (checked against the migrations by the tests).
MAIN_HEAD = "0003_main_segment_content"
CHUNKS_HEAD = "0001_chunks"
MAIN_DB = "raft.db"
CHUNKS_DB = "chunks.db"
#: log key = group_id * KEY_SPAN + index: one b-tree, no secondary index on the append path.
KEY_SHIFT = 40
KEY_SPAN = 1 << KEY_SHIFT
#: page size of chunks.db (set when the file is created; raft.db keeps SQLite's 4 KiB)
CHUNKS_PAGE_SIZE = 65536
#: A pre-allocated file of DISK_RESERVE_BYTES in data_dir that holds no data: when a full disk makes
#: the writes of opening a store fail (a snapshot filled it), open deletes it and retries, so the
#: store can drop the partial snapshot and give its space back (see :mod:`raft_sqlite.reserve`).
RESERVE_FILE = "disk-reserve"
DISK_RESERVE_BYTES = 1 << 20
