"""Alembic migrations and the SQLAlchemy models describe the same schema, on both databases."""

from __future__ import annotations

from contextlib import closing

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import billing.models  # noqa: F401  (the billing tables are part of the metadata compared)
import security.models  # noqa: F401  (and the access tables)
from archive import Archive, orders, outbox  # noqa: F401  (the order and event tables are part of the metadata compared)
from archive.db import alembic_config
from archive.models import Base
from tests.conftest import Backend


def _differences(arc: Archive) -> list:
    with arc.db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_models_match_migrations(index_backend: Backend):
    with closing(Archive(index_backend.settings)) as arc:
        assert _differences(arc) == []


def test_downgrade_to_initial_and_upgrade_again(index_backend: Backend):
    with closing(Archive(index_backend.settings)) as arc:
        with arc.db.engine.connect() as conn:
            cfg = alembic_config(arc.db.engine)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        tables = set(inspect(arc.db.engine).get_table_names())
        assert "job" not in tables
        assert "stable_at" not in {c["name"] for c in inspect(arc.db.engine).get_columns("study")}
        arc.db.upgrade()
        assert _differences(arc) == []
