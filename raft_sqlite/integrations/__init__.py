"""Integrations of raft_sqlite with existing Raft engines.

Each integration lives in its own module and imports its engine lazily, so that importing
``raft_sqlite`` never requires an optional dependency:

- :mod:`raft_sqlite.integrations.pysyncobj`: PySyncObj 0.3.17 (extra ``pysyncobj``):
  ``RaftSqliteJournal``, ``create_journal``, ``patch_pysyncobj``.
"""
