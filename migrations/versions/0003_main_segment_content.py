"""raft.db: a content digest per sealed log segment (``log_segments.content_crc``).

The digest (CRC32 over ``"<term> <kind>\\n" + payload`` of every record, in index order; see
:data:`raft_sqlite.wal.CONTENT_SQL`) lets recovery and ``verify`` check a sealed segment with one SQLite
aggregate instead of a Python loop per record. Segments sealed before this revision keep NULL and are
checked record by record, as before.

Revision ID: 0003_main_segment_content
Revises: 0002_main_views
"""
import sqlalchemy as sa
from alembic import op

revision = "0003_main_segment_content"
down_revision = "0002_main_views"
branch_labels = None
depends_on = None


def upgrade():
    # 0001 creates its tables from the current declarations in raft_sqlite.schema, so a store created by
    # this code already has the column; a store created before this revision gets it here.
    cols = {row[1] for row in op.get_bind().exec_driver_sql("PRAGMA table_info(log_segments)")}
    if "content_crc" not in cols:
        op.add_column("log_segments", sa.Column("content_crc", sa.BigInteger, nullable=True))


def downgrade():
    with op.batch_alter_table("log_segments") as b:
        b.drop_column("content_crc")
