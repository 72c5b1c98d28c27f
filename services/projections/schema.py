"""Read-model tables (SQLAlchemy Core). Every projection table can be built under a suffix
(``issues__rebuild``) so ``needle rebuild`` fills fresh tables while the live ones serve."""
from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)
from sqlalchemy.schema import CreateIndex, CreateTable

PROJECTION = "read_models"
PROJECTION_VERSION = 10  # bump when the projection functions change: the worker rebuilds on start


def tables(suffix: str = "") -> tuple[MetaData, dict[str, Table]]:
    md = MetaData()
    issues = Table(
        f"issues{suffix}", md,
        Column("id", Text, primary_key=True),
        Column("grid", Text, nullable=False),
        Column("category", Text, nullable=False),
        Column("title", Text, nullable=False),
        Column("urgency", Text, nullable=False),
        Column("status", Text, nullable=False),
        Column("level", Text),
        Column("owner_area", Text),
        Column("areas", ARRAY(Text), nullable=False),
        Column("reported_at", DateTime(timezone=True), nullable=False),
        Column("dispatched_at", DateTime(timezone=True)),
        Column("closed_at", DateTime(timezone=True)),
        Column("closed_on_time", Boolean),
        Column("first_resolved_at", DateTime(timezone=True)),  # 解决率 counts an issue once
        Column("lead_task", Text),
        Column("lead_department", Text),
        Column("lead_status", Text),
        Column("next_due", DateTime(timezone=True)),
        Column("reopen_count", Integer, nullable=False),
        Column("escalations", Integer, nullable=False),
        Column("satisfaction", Text),
        Column("feedback_source", Text),  # grid_worker_phone | resident (the resident's own answer stands)
        Column("version", Integer, nullable=False),
        Column("seq", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("lat", Float),  # the reported location, for similar issues (合并办理)
        Column("lon", Float),
        Column("merged_into", Text),
        Column("reporter", Text),  # the token subject that reported it (a grid worker's 我的上报)
        Column("text_shredded_at", DateTime(timezone=True)),  # its free text crypto-shredded (retention)
        # the description may be shown to anonymous Open311 readers (the reporter's mark, a moderator's decision)
        Column("description_public", Boolean, nullable=False),
    )
    Index(f"ix_issues{suffix}_similar", issues.c.category, issues.c.status, issues.c.lat)
    Index(f"ix_issues{suffix}_areas", issues.c.areas, postgresql_using="gin")
    Index(f"ix_issues{suffix}_reported", issues.c.reported_at.desc(), issues.c.id.desc())
    Index(f"ix_issues{suffix}_open_due", issues.c.next_due, postgresql_where=issues.c.next_due.isnot(None))
    tasks = Table(
        f"tasks{suffix}", md,
        Column("id", Text, primary_key=True),
        Column("issue_id", Text, nullable=False),
        Column("department", Text, nullable=False),
        Column("role", Text, nullable=False),
        Column("level", Text, nullable=False),
        Column("status", Text, nullable=False),
        Column("clock", Text, nullable=False),
        Column("category", Text, nullable=False),
        Column("title", Text, nullable=False),
        Column("grid", Text, nullable=False),
        Column("dispatched_at", DateTime(timezone=True), nullable=False),
        Column("acknowledge_due", DateTime(timezone=True), nullable=False),
        Column("resolve_due", DateTime(timezone=True), nullable=False),
        Column("acknowledged_at", DateTime(timezone=True)),
        Column("resolved_at", DateTime(timezone=True)),
        Column("returned_at", DateTime(timezone=True)),
        Column("breached", Text, nullable=False),
        Column("extended", Boolean, nullable=False),
        Column("seq", BigInteger, nullable=False),
    )
    Index(f"ix_tasks{suffix}_dept", tasks.c.department, tasks.c.status, tasks.c.dispatched_at.desc())
    Index(f"ix_tasks{suffix}_issue", tasks.c.issue_id)
    stats = Table(
        f"stats_daily{suffix}", md,
        Column("day", Date, nullable=False),
        Column("scope", Text, nullable=False),  # area | dept
        Column("key", Text, nullable=False),
        Column("metric", Text, nullable=False),
        Column("n", BigInteger, nullable=False),
        PrimaryKeyConstraint("scope", "key", "day", "metric"),
    )
    audit = Table(
        f"audit{suffix}", md,
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("issue_id", Text, nullable=False),
        Column("type", Text, nullable=False),
        Column("actor", Text),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("summary", Text, nullable=False),
    )
    Index(f"ix_audit{suffix}_issue", audit.c.issue_id, audit.c.seq)
    visits = Table(  # household visits (走访): the household only as its HMAC digest, never in clear
        f"visits{suffix}", md,
        Column("id", Text, primary_key=True),
        Column("grid", Text, nullable=False),
        Column("areas", ARRAY(Text), nullable=False),
        Column("household", Text, nullable=False),
        Column("kind", Text, nullable=False),
        Column("campaign", Text),
        Column("visited_at", DateTime(timezone=True), nullable=False),
        Column("visitor", Text, nullable=False),
        Column("note", Text),
        Column("issues", ARRAY(Text), nullable=False),  # raised from the visit: its own list and the reports naming it
        Column("seq", BigInteger, nullable=False),
    )
    Index(f"ix_visits{suffix}_areas", visits.c.areas, postgresql_using="gin")
    Index(f"ix_visits{suffix}_grid", visits.c.grid, visits.c.visited_at.desc())
    Index(f"ix_visits{suffix}_campaign", visits.c.campaign, visits.c.grid,
          postgresql_where=visits.c.campaign.isnot(None))
    checkpoints = Table(
        f"checkpoints{suffix}", md,
        Column("projection", Text, primary_key=True),
        Column("seq", BigInteger, nullable=False),
        Column("version", Integer, nullable=False),
    )
    return md, {"issues": issues, "tasks": tasks, "stats_daily": stats, "audit": audit, "visits": visits,
                "checkpoints": checkpoints}


def ddl(suffix: str = "", defer: tuple[str, ...] = ()) -> list[str]:
    """CREATE statements (IF NOT EXISTS) for every table and index of the read models, but the secondary indexes
    of the tables named in ``defer`` (a bulk load builds them afterwards: ``index_ddl``)."""
    from sqlalchemy.dialects import postgresql

    _, named = tables(suffix)
    dialect = postgresql.dialect()
    out: list[str] = []
    for name, t in named.items():
        out.append(str(CreateTable(t, if_not_exists=True).compile(dialect=dialect)))
        if name not in defer:
            out += index_ddl(suffix, (name,))
    return out


def index_ddl(suffix: str, names: tuple[str, ...]) -> list[str]:
    """CREATE INDEX statements (IF NOT EXISTS) of the secondary indexes of the tables ``names``."""
    from sqlalchemy.dialects import postgresql

    _, named = tables(suffix)
    dialect = postgresql.dialect()
    return [str(CreateIndex(ix, if_not_exists=True).compile(dialect=dialect)) for n in names for ix in named[n].indexes]


TABLE_NAMES = ("issues", "tasks", "stats_daily", "audit", "visits", "checkpoints")
ISSUE_COLUMNS = [c.name for c in tables()[1]["issues"].columns]
TASK_COLUMNS = [c.name for c in tables()[1]["tasks"].columns]
VISIT_COLUMNS = [c.name for c in tables()[1]["visits"].columns]
