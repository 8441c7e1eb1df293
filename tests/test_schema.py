"""Migrations: models and migrations must not drift; upgrade and downgrade work on both databases."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import create_engine, inspect

from helpers import both_databases, build_app


@both_databases
def test_models_match_migrations(database_url):
    """Autogenerate against the migrated database finds nothing: a model change without a
    migration (or the other way round) fails here."""
    from webapp.extensions import db
    from webapp.models import include_object
    engine = create_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include_object})
        diff = compare_metadata(context, db.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_and_downgrade_on_empty_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    app = build_app(url, "http://127.0.0.1:9")
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
        app = build_app(url, "http://127.0.0.1:9")
        with app.app_context():
            upgrade()
            engine = create_engine(url)
            inspector = inspect(engine)
            assert {"users", "conversations", "messages"} <= set(inspector.get_table_names())
            indexes = {ix["name"] for ix in inspector.get_indexes("messages")}
            assert {"ix_messages_conversation_id_id", "ix_messages_content_trgm"} <= indexes
            assert "ix_conversations_title_trgm" in {ix["name"] for ix in inspector.get_indexes("conversations")}
            downgrade(revision="base")
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
            engine.dispose()
            from webapp.extensions import db
            db.engine.dispose()
    finally:
        with psycopg.connect(pg_database.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgresql_search_can_use_the_trigram_indexes(pg_url):
    """The sidebar search's conditions (ILIKE '%word%' on titles, and on finished messages) match
    the trigram indexes, partial predicate included, so PostgreSQL can answer a search from them
    instead of reading every message. Sequential scans are switched off to ask "can it?", not "does
    the planner like it on a nearly empty table?"."""
    from sqlalchemy import select

    from webapp.models import Conversation, Message
    from webapp.service import search_conditions
    title_matches, message_matches = search_conditions("zebra")
    app = build_app(pg_url, "http://127.0.0.1:9")
    with app.app_context():
        from webapp.extensions import db
        plans = []
        with db.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            for statement in (select(Message.id).where(*message_matches),
                              select(Conversation.id).where(title_matches)):
                compiled = statement.compile(db.engine, compile_kwargs={"render_postcompile": True})
                rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params).scalars()
                plans.append("\n".join(rows))
        db.engine.dispose()
    # The index condition itself, not only the index's name: a full scan of the partial index (all
    # finished messages) would name it too.
    assert "ix_messages_content_trgm" in plans[0] and "Index Cond: (content ~~* " in plans[0], plans[0]
    assert "ix_conversations_title_trgm" in plans[1] and "Index Cond: ((title)::text ~~* " in plans[1], plans[1]
