"""visits: household visits (走访) of the grids' service teams, for coverage (入户率) and campaign reach

Revision ID: 0003
Revises: 0002
"""
from alembic import op

from services.projections.schema import index_ddl, tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    visits = tables("")[1]["visits"]
    op.execute(str(CreateTable(visits, if_not_exists=True).compile(dialect=postgresql.dialect())))
    for statement in index_ddl("", ("visits",)):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS visits")
