"""idempotency keys: a retried POST /chat/ or /v1/chat/completions finds the answer it opened

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 09:40:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'idempotency_keys',
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('fingerprint', sa.String(length=64), nullable=False),
        sa.Column('message_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_idempotency_keys_user_id_users'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['message_id'], ['messages.id'],
                                name=op.f('fk_idempotency_keys_message_id_messages'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('user_id', 'key', name=op.f('pk_idempotency_keys')),
    )
    op.create_index('ix_idempotency_keys_user_id_created_at', 'idempotency_keys', ['user_id', 'created_at'],
                    unique=False)
    # Deleting a message (or a conversation's messages) looks its key up by message_id.
    op.create_index('ix_idempotency_keys_message_id', 'idempotency_keys', ['message_id'], unique=False)


def downgrade():
    op.drop_index('ix_idempotency_keys_message_id', table_name='idempotency_keys')
    op.drop_index('ix_idempotency_keys_user_id_created_at', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
