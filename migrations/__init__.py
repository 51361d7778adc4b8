"""Alembic environment of raft_sqlite (installed as the package ``raft_sqlite.migrations``).

Two branches, one per database file: ``main`` (raft.db) and ``chunks`` (chunks.db). Run
programmatically by :func:`raft_sqlite.migrate.upgrade`; see README "Schema and migrations".
"""
