"""raft.db: what a clean close recorded about each group's open segment (table ``close_digests``).

The next open checks each open segment against its row with one SQLite aggregate (as a sealed segment is
checked) instead of verifying every record's CRC in Python, and deletes the rows (see
:data:`raft_sqlite.schema.close_digests`). A store without the table simply has every open segment checked
record by record, as before.

Revision ID: 0004_main_close_digests
Revises: 0003_main_segment_content
"""
from alembic import op

from raft_sqlite import schema

revision = "0004_main_close_digests"
down_revision = "0003_main_segment_content"
branch_labels = None
depends_on = None


def upgrade():
    schema.metadata.create_all(op.get_bind(), tables=[schema.close_digests])


def downgrade():
    op.drop_table("close_digests")
