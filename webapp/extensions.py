"""Flask extensions, created unbound and bound to the app in create_app()."""
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from htmx_flask import Htmx
from sqlalchemy import MetaData

from . import direct_sql
from .llm_service import LLMService

# Named constraints so Alembic migrations are stable on PostgreSQL and SQLite alike.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

db = SQLAlchemy(metadata=MetaData(naming_convention=NAMING))
migrate = Migrate()
login_manager = LoginManager()
csrf = CSRFProtect()
htmx = Htmx()
llm_service = LLMService()


def execute_alone(statement, params, first=None):
    """PostgreSQL, with no transaction open in the session: run ONE statement on a pooled connection
    in autocommit, so it is its own transaction (a single statement is all or nothing anyway) and
    costs one round trip, without BEGIN and COMMIT around it. It goes around the session (whose
    bookkeeping costs more than the statement) and holds the connection only for the statement.
    `first`: (statement, params) that must run before it, in its transaction, as statements of their
    own (a lock, so that the statement's snapshot is taken once it is held): then the two run in
    BEGIN ... COMMIT, and `params` may be a function of `first`'s rows (raising rolls back). Returns
    the rows, fetched; None where this does not apply (SQLite, or a transaction already open in the
    session): the caller runs the statement the usual way. The statement is sent by psycopg itself
    where it can be (webapp/direct_sql.py: SQLAlchemy's Connection costs more than the round trip)."""
    session = db.session
    if session().in_transaction():
        return None
    engine = db.engine
    if engine.dialect.name != "postgresql":
        return None
    rows = direct_sql.execute(engine, statement, params, first)
    if rows is not None:
        return rows
    if first is not None:
        with engine.begin() as connection:
            ahead = connection.execute(*first).all()
            return _rows(connection.execute(statement, params(ahead) if callable(params) else params))
    with _autocommit(engine).connect() as connection:
        return _rows(connection.execute(statement, params))


def _rows(result):
    return result.all() if result.returns_rows else []  # a write with no RETURNING: no rows


def execute_read(statement, params):
    """A read's rows: alone where it can be (execute_alone), else in the session's transaction."""
    rows = execute_alone(statement, params)
    return db.session.execute(statement, params).all() if rows is None else rows


def execute_write(statement, params):
    """A write of its own (it needs nothing else in its transaction): alone where it can be
    (execute_alone), else in the session's transaction, committed."""
    if execute_alone(statement, params) is None:
        db.session.execute(statement, params)
        db.session.commit()


def _autocommit(engine):
    """The engine's view whose connections run in autocommit (same pool; reset when given back)."""
    view = engine.__dict__.get("_webapp_autocommit")
    if view is None:
        view = engine.__dict__["_webapp_autocommit"] = engine.execution_options(isolation_level="AUTOCOMMIT")
    return view
