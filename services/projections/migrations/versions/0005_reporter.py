"""issues.reporter: a grid worker's 我的上报 lists the reports of the signed-in person (``GET /v1/issues?reporter=me``)

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled for every issue by the rebuild that PROJECTION_VERSION 8 starts
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS reporter TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE issues DROP COLUMN IF EXISTS reporter")
