"""issues.text_shredded_at: when the issue's free text was crypto-shredded (its data key destroyed), so that the
retention policy finds the closed issues it has not shredded yet

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled for every issue by the rebuild that the PROJECTION_VERSION bump starts
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS text_shredded_at TIMESTAMPTZ")


def downgrade() -> None:
    op.execute("ALTER TABLE issues DROP COLUMN IF EXISTS text_shredded_at")
