"""Schema migrations of the read models with alembic (run at start, before the worker).

The live tables are migrated by alembic revisions in ``migrations/versions``; the fresh
``__rebuild`` tables of ``needle rebuild`` are created from the same SQLAlchemy metadata."""
from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def upgrade(database_url: str) -> None:
    """Bring the live read-model schema to the newest revision (alembic runs its own loop: use a thread)."""
    await asyncio.to_thread(command.upgrade, alembic_config(database_url), "head")
