"""issues.reporter: a grid worker's 我的上报 lists the reports of the signed-in person (``GET /v1/issues?reporter=me``)

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled for every issue by the rebuild that PROJECTION_VERSION 5 starts
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS reporter TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE issues DROP COLUMN IF EXISTS reporter")
