"""search: trigram indexes for the sidebar search on PostgreSQL (titles, and finished message text)

The search is a case-insensitive substring match (ILIKE '%word%'), which no B-tree can help; pg_trgm's
GIN indexes can. The message index is partial: only finished messages are in it, so the text a
streaming answer flushes four times a second never rewrites index entries; the search asks for the
same statuses. Nothing changes on SQLite. Where pg_trgm cannot be created (a managed database that
refuses extensions), the migration goes on without the indexes: search still works, only slower.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 18:15:00
"""
import logging

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")
FINISHED = "status IN ('complete', 'error', 'cancelled', 'interrupted')"


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    try:
        with bind.begin_nested():  # a savepoint: a refusal must not abort the whole upgrade
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError as exc:
        log.warning("pg_trgm is not available (%s); search works without its indexes, only slower",
                    str(exc.orig).strip().splitlines()[0])
        return
    op.execute("CREATE INDEX IF NOT EXISTS ix_messages_content_trgm ON messages "
               f"USING gin (content gin_trgm_ops) WHERE {FINISHED}")
    op.execute("CREATE INDEX IF NOT EXISTS ix_conversations_title_trgm ON conversations "
               "USING gin (title gin_trgm_ops)")


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_conversations_title_trgm")
    op.execute("DROP INDEX IF EXISTS ix_messages_content_trgm")
