"""Migrations: models and migrations must not drift; upgrade and downgrade work on both databases."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import create_engine, inspect

from conftest import _make_app, both_databases


@both_databases
def test_models_match_migrations(database_url):
    """Autogenerate against the migrated database finds nothing: a model change without a
    migration (or the other way round) fails here."""
    from webapp.extensions import db
    engine = create_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, db.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_and_downgrade_on_empty_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    app = _make_app(url, "http://127.0.0.1:9")
    with app.app_context():
        upgrade()
        assert {"users", "conversations", "messages"} <= set(inspect(create_engine(url)).get_table_names())
        downgrade(revision="base")
        assert set(inspect(create_engine(url)).get_table_names()) <= {"alembic_version"}


def test_upgrade_and_downgrade_on_empty_postgresql(pg_database):
    import psycopg
    name = pg_database.name + "_mig"
    with psycopg.connect(pg_database.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_database.url.rsplit("/", 1)[0] + "/" + name
    try:
        app = _make_app(url, "http://127.0.0.1:9")
        with app.app_context():
            upgrade()
            engine = create_engine(url)
            inspector = inspect(engine)
            assert {"users", "conversations", "messages"} <= set(inspector.get_table_names())
            indexes = {ix["name"] for ix in inspector.get_indexes("messages")}
            assert "ix_messages_conversation_id_id" in indexes
            downgrade(revision="base")
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
            engine.dispose()
            from webapp.extensions import db
            db.engine.dispose()
    finally:
        with psycopg.connect(pg_database.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
