"""issues.lat, issues.lon, issues.merged_into: the reported point and the merge target (合并办理), which the
table built by 0001 from the current schema has, but a database made before them lacked

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled for every issue by the rebuild that the PROJECTION_VERSION bump starts
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS lat DOUBLE PRECISION")
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS lon DOUBLE PRECISION")
    op.execute("ALTER TABLE issues ADD COLUMN IF NOT EXISTS merged_into TEXT")


def downgrade() -> None:
    for column in ("merged_into", "lon", "lat"):
        op.execute(f"ALTER TABLE issues DROP COLUMN IF EXISTS {column}")
