"""issues.description_public: whether anonymous Open311 lists show the issue's description (the reporter marked
it public, or a moderator approved it: ``description_publication_changed``)

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled for every issue by the rebuild that PROJECTION_VERSION 9 starts (false until then: nothing published)
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS description_public BOOLEAN NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE issues DROP COLUMN IF EXISTS description_public")
