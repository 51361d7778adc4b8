"""raft.db: initial schema (node, groups, log, segments, metadata, snapshots, backups, events).

Revision ID: 0001_main
Revises:
"""
from alembic import op

from raft_sqlite import schema

revision = "0001_main"
down_revision = None
branch_labels = ("main",)
depends_on = None

TABLES = ["node", "settings", "groups", "log_entries", "log_segments", "raft_meta", "snapshots",
          "backups", "recovery_events"]


def upgrade():
    bind = op.get_bind()
    schema.metadata.create_all(bind, tables=[schema.metadata.tables[t] for t in TABLES])
    op.execute(schema.GUARD_TRIGGER)
    op.execute(schema.GROUP_STATUS_VIEW)


def downgrade():
    op.execute("DROP VIEW group_status")
    op.execute("DROP TRIGGER log_entries_guard_delete")
    for t in reversed(TABLES):
        op.drop_table(t)
