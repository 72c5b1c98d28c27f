"""issues.first_resolved_at: 解决率 counts an issue once, whatever rework or escalation follows

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS first_resolved_at TIMESTAMP WITH TIME ZONE")


def downgrade() -> None:
    op.execute("ALTER TABLE issues DROP COLUMN IF EXISTS first_resolved_at")
