"""messages.finished_at: written but never read (the heartbeat of a final answer says when it ended)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 07:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


# A plain ALTER TABLE ... DROP COLUMN on both databases (SQLite has it since 3.35): no table copy,
# so the partial and trigram indexes stay as they are.
def upgrade():
    op.drop_column("messages", "finished_at")


def downgrade():
    op.add_column("messages", sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
