"""api key limits: an admin's per-key override of the answer limits (flask set-limits --key)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 08:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("api_keys", sa.Column("max_running", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("max_per_minute", sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("max_per_minute")
        batch.drop_column("max_running")
