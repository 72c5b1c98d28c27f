"""issues.feedback_source: whose 回访 counts (the resident's own answer over the grid worker's by phone)

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS feedback_source TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE issues DROP COLUMN IF EXISTS feedback_source")
