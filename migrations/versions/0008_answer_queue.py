"""answer queue and per-person limits: 'queued' answers in the active index; users' limit overrides

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 07:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('queued', 'pending', 'streaming')")
ACTIVE_BEFORE = sa.text("status IN ('pending', 'streaming')")


def upgrade():
    # The partial index also holds answers waiting for a slot: the queue reads it, and so does the
    # orphan sweep (a queued answer whose worker died is interrupted like any other).
    op.drop_index("ix_messages_active", table_name="messages")
    op.create_index("ix_messages_active", "messages", ["status", "heartbeat_at"],
                    postgresql_where=ACTIVE, sqlite_where=ACTIVE)
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_per_minute", sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table("users") as batch:
        batch.drop_column("max_per_minute")
        batch.drop_column("max_running")
    op.execute("UPDATE messages SET status = 'pending' WHERE status = 'queued'")
    op.drop_index("ix_messages_active", table_name="messages")
    op.create_index("ix_messages_active", "messages", ["status", "heartbeat_at"],
                    postgresql_where=ACTIVE_BEFORE, sqlite_where=ACTIVE_BEFORE)
