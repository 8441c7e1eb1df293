"""active messages: a partial index over the answers being generated, for the orphan sweep

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 18:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('pending', 'streaming')")


def upgrade():
    op.create_index("ix_messages_active", "messages", ["status", "heartbeat_at"],
                    postgresql_where=ACTIVE, sqlite_where=ACTIVE)


def downgrade():
    op.drop_index("ix_messages_active", table_name="messages")
