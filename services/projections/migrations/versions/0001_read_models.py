"""read models: issues, tasks, stats_daily, audit, checkpoints

Revision ID: 0001
Revises:
"""
from alembic import op

from services.projections.schema import ddl

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in ddl(""):
        op.execute(statement)


def downgrade() -> None:
    for name in ("audit", "stats_daily", "tasks", "issues", "checkpoints"):
        op.execute(f"DROP TABLE IF EXISTS {name}")
