"""Alembic environment for the read models, run programmatically (no alembic.ini): see
``services/projections/migrate.py``. Uses the async engine (asyncpg) the service already has."""
from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.projections.schema import tables

target_metadata = tables("")[0]


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, version_table="alembic_version")
    with context.begin_transaction():
        context.run_migrations()


async def _online() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url") or "")
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


asyncio.run(_online())
