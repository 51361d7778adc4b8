"""chunks.db: snapshot chunk blobs.

Revision ID: 0001_chunks
Revises:
"""
from alembic import op

from raft_sqlite import schema

revision = "0001_chunks"
down_revision = None
branch_labels = ("chunks",)
depends_on = None


def upgrade():
    schema.chunks_metadata.create_all(op.get_bind(), tables=[schema.snapshot_chunks])


def downgrade():
    op.drop_table("snapshot_chunks")
