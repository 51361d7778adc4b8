"""raft.db: inspection views (group_status redefined richer; snapshot_chain, segments, backup_history,
recovery_log). The view text lives in :data:`raft_sqlite.schema.VIEWS`.

Revision ID: 0002_main_views
Revises: 0001_main
"""
from alembic import op

from raft_sqlite import schema

revision = "0002_main_views"
down_revision = "0001_main"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("DROP VIEW IF EXISTS group_status")  # 0001's narrower version
    for name, select in schema.VIEWS.items():
        op.execute(f"DROP VIEW IF EXISTS {name}")
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade():
    for name in reversed(list(schema.VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute(schema.GROUP_STATUS_VIEW)
