"""Alembic environment: runs against the engine the archive hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from archive.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = config.attributes.get("engine")
    if engine is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no engine and no sqlalchemy.url given to the migrations")
        engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # SQLite has transactional DDL: run every pending migration in the one transaction
        # that pacsbridge opened (BEGIN IMMEDIATE), so that concurrent starters serialise.
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run `pacsbridge db upgrade`")
run_migrations_online()
