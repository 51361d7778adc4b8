"""Snapshots: chunked, checksummed snapshot storage, delta chains, retention and scheduling.

Layout
------
* The **manifest** of a snapshot is one row of ``raft.db``'s ``snapshots`` table (id, group, index,
  term, kind FULL/DELTA, parent, status WRITING/DURABLE, size, chunk count, sha256 of the whole
  snapshot, per-structure entries as JSON, source local/install, CRC32 over the manifest fields).
* Its **bytes** are chunks (default 1 MiB) in ``chunks.db``'s ``snapshot_chunks`` table, keyed
  ``snapshot_id << 32 | seq`` (:data:`raft_sqlite.layout.CHUNK_SEQ_SPAN`), each with its CRC32.
  ``chunks.db`` is a separate SQLite file, so that streaming a big snapshot never holds the write lock
  of ``raft.db`` (which every log append needs) nor grows its WAL.

Write protocol (:meth:`SnapshotManager.write`)
----------------------------------------------
1. A WRITING manifest row is inserted (one commit of ``raft.db``).
2. Chunks are streamed to ``chunks.db`` in batches of ``commit_bytes`` (one transaction per batch, under
   ``store.chunks_lock``), so memory stays bounded whatever the snapshot size.
3. On a clean exit the last batch is committed (durable per the fsync mode) and THEN one committer op
   on ``raft.db`` flips the manifest to DURABLE with its sizes and digest *and* moves
   ``groups.snapshot_index/snapshot_term`` (and, for an install, discards the log it replaces). The
   snapshot becomes visible atomically with that commit; a crash at any earlier point leaves a
   WRITING row that the next open removes (local snapshots) or keeps for resumption (installs).

Reading (:meth:`SnapshotManager.open`) verifies each chunk's CRC32 as it is read and the sha256 of the
whole snapshot at end of stream; a mismatch raises :class:`~raft_sqlite.errors.CorruptionError`.

Modules (one concept each; import the names from ``raft_sqlite.snapshot``, which re-exports them all)
-------------------------------------------------------------------------------------------------------
* :mod:`.manifest`: :class:`SnapshotKind`, :class:`SnapshotMeta`, the manifest CRC, argument checks.
* :mod:`.chunks`: :class:`SnapshotStore`, the chunk database and the manifest rows of one node.
* :mod:`.reader`: :class:`SnapshotReader`, the verifying stream over a snapshot's chunks.
* :mod:`.writer`: :class:`SnapshotWriter`, the write protocol above (begin, stream, finalize, discard).
* :mod:`.chain`: :class:`DeltaSnapshot` and :class:`SnapshotChain`.
* :mod:`.manager`: :class:`SnapshotManager` (``store.snapshots(group)``): queries, writers, reading,
  retention.
* :mod:`.scheduler`: :class:`SnapshotScheduler`, background captures.

Imports run one way: manifest <- chunks <- reader <- writer <- manager <- scheduler (chain needs only
manifest); the writer and the chain see the manager through small protocols, never by importing it.
"""

from __future__ import annotations

import logging

from .chain import DeltaSnapshot, SnapshotChain, chains_of
from .chunks import CHUNKS_CACHE_KIB as CHUNKS_CACHE_KIB
from .chunks import SnapshotStore
from .manager import (
           DEFAULT_CHUNK_SIZE,
           DEFAULT_COMMIT_BYTES,
           DEFAULT_KEEP_CHAINS,
           DEFAULT_MAX_CHAIN_LENGTH,
           SnapshotManager,
)
from .manager import MAX_CHUNK_SIZE as MAX_CHUNK_SIZE
from .manifest import (
           MANIFEST_COLUMNS,
           SnapshotKind,
           SnapshotMeta,
           manifest_crc,
           manifest_fields_crc,
           meta_from_row,
)
from .reader import ChunkSource, SnapshotReader
from .scheduler import SnapshotScheduler
from .writer import SnapshotWriter

#: The logger of every snapshot module (one name, as when they were one module).
log = logging.getLogger("raft_sqlite.snapshot")


__all__ = ["MANIFEST_COLUMNS", "ChunkSource", "chains_of", "meta_from_row", "DEFAULT_CHUNK_SIZE", "DEFAULT_COMMIT_BYTES", "DEFAULT_KEEP_CHAINS", "DEFAULT_MAX_CHAIN_LENGTH",
           "DeltaSnapshot", "SnapshotChain", "SnapshotKind", "SnapshotManager", "SnapshotMeta", "SnapshotReader",
           "SnapshotScheduler", "SnapshotStore", "SnapshotWriter", "manifest_crc", "manifest_fields_crc"]
