"""raft.db: ``close_digests`` gains ``span_crc``, ``span_bytes`` and ``last_term``.

With them the next open checks the open segments of many small groups in one range scan per slice instead
of one aggregate per segment (see :func:`raft_sqlite.logscan.check_close_digests`). The table only ever
holds what the last clean close wrote, and every open deletes its rows, so the upgrade recreates it empty:
the open that runs it then checks every open segment record by record, as after a crash.

Revision ID: 0005_main_close_digest_spans
Revises: 0004_main_close_digests
"""
import sqlalchemy as sa
from alembic import op

from raft_sqlite import schema

revision = "0005_main_close_digest_spans"
down_revision = "0004_main_close_digests"
branch_labels = None
depends_on = None


def upgrade():
    op.drop_table("close_digests")
    schema.metadata.create_all(op.get_bind(), tables=[schema.close_digests])


def downgrade():
    op.drop_table("close_digests")
    op.create_table(
        "close_digests",
        sa.Column("segment_id", sa.Integer, primary_key=True),
        sa.Column("entry_count", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("checksum", sa.BigInteger, nullable=False),
        sa.Column("content_crc", sa.BigInteger, nullable=False),
    )
