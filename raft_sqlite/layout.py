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
#: the data_dir lock file (flock, holder record inside): see :mod:`raft_sqlite.lock`. Never backed up.
LOCK_FILE = "raft.lock"
#: log key = group_id * KEY_SPAN + index: one b-tree, no secondary index on the append path.
KEY_SHIFT = 40
KEY_SPAN = 1 << KEY_SHIFT
#: page size of chunks.db (set when the file is created; raft.db keeps SQLite's 4 KiB)
CHUNKS_PAGE_SIZE = 65536
