"""The statements a turn runs alone, sent by psycopg itself (webapp/direct_sql.py), on PostgreSQL:
the same rows and errors as through SQLAlchemy, the pool kept whole, and instrumentation still
seeing every statement."""
from datetime import datetime

import pytest
from sqlalchemy import bindparam, create_engine, event, exc, insert, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from helpers import make_user


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


@pytest.fixture
def sa_executes(monkeypatch):
    """How many statements went through SQLAlchemy's Connection.execute."""
    calls = []
    original = Connection.execute

    def counting(self, statement, *args, **kwargs):
        calls.append(statement)
        return original(self, statement, *args, **kwargs)
    monkeypatch.setattr(Connection, "execute", counting)
    return calls


def _conversation_read():
    from webapp.models import Conversation
    return select(Conversation.id, Conversation.title, Conversation.created_at).where(
        Conversation.user_id == bindparam("b_user_id")).order_by(Conversation.id)


def _with_conversation(app, title="Привет\x00мир"):
    user_id = make_user(app, "direct")
    from webapp.extensions import db
    from webapp.models import Conversation
    with app.app_context():
        conversation = Conversation(user_id=user_id, title=title, model="tinyllama")
        db.session.add(conversation)
        db.session.commit()
        return user_id, conversation.id


def _every_column(**values):
    """A conversation's columns, every one given (nothing left for a Python-side default)."""
    return {"user_id": bindparam("b_user"), "model": "m", "system_prompt": "", "message_count": 0, "source": "web",
            "created_at": bindparam("b_now"), "updated_at": bindparam("b_now"), **values}


def test_a_statement_run_again_goes_straight_to_psycopg_with_the_same_rows(ctx, sa_executes):
    from webapp.extensions import db, execute_alone
    user_id, conversation_id = _with_conversation(ctx)
    statement = _conversation_read()
    with db.engine.connect() as connection:
        expected = connection.execute(statement, {"b_user_id": user_id}).all()
    sa_executes.clear()
    first = execute_alone(statement, {"b_user_id": user_id})
    assert len(sa_executes) == 1  # a statement seen once may be one built per call: SQLAlchemy's cache
    second = execute_alone(statement, {"b_user_id": user_id})
    third = execute_alone(statement, {"b_user_id": user_id})
    assert len(sa_executes) == 1  # kept compiled from its second run on
    for rows in (first, second, third):
        assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
        (row,) = rows
        assert row.id == conversation_id and row.title == "Привет\ufffdмир"  # NUL stored as U+FFFD
        assert row._asdict().keys() == {"id", "title", "created_at"}
        assert isinstance(row.created_at, datetime) and row.created_at.tzinfo is not None
    assert db.engine.pool.checkedout() == 0


def test_parameters_pass_through_the_statements_types(ctx):
    """A bound value is processed by its column's type as SQLAlchemy would (SafeText: NUL -> U+FFFD)."""
    from webapp.extensions import db, execute_alone
    from webapp.models import Conversation
    user_id, _ = _with_conversation(ctx)
    now = datetime.now().astimezone()
    statement = insert(Conversation).values(_every_column(title=bindparam("b_title"))).returning(Conversation.id)
    ids = [execute_alone(statement, {"b_user": user_id, "b_title": f"a\x00{n}", "b_now": now})[0].id
           for n in range(3)]
    titles = db.session.scalars(select(Conversation.title).where(Conversation.id.in_(ids))).all()
    db.session.rollback()
    assert sorted(titles) == ["a\ufffd0", "a\ufffd1", "a\ufffd2"]


def test_a_database_error_is_sqlalchemys_and_the_connection_goes_back(ctx):
    from webapp.extensions import db, execute_alone
    from webapp.models import Message
    statement = insert(Message).values(conversation_id=bindparam("b_conversation"), role="user",
                                       content="x", status="complete").returning(Message.id)
    pool = db.engine.pool
    for _ in range(3):  # the first run goes through SQLAlchemy, the rest straight to psycopg
        with pytest.raises(exc.IntegrityError) as raised:
            execute_alone(statement, {"b_conversation": 987654321})  # no such conversation
        assert raised.value.orig.sqlstate == "23503" and not raised.value.connection_invalidated
        assert pool.checkedout() == 0
    assert execute_alone(select(text("1")), {}) is not None  # the pool still works


def test_a_refusal_between_the_two_statements_writes_nothing(ctx):
    """`first` then the statement in one transaction; parameters computed from `first`'s rows may
    refuse (a token revoked meanwhile): rolled back, and the connection goes back to the pool."""
    from webapp.extensions import db, execute_alone
    from webapp.models import Conversation
    user_id, _ = _with_conversation(ctx)
    lock = (select(text("pg_advisory_xact_lock(42)")), {})
    statement = insert(Conversation).values(_every_column(title="t"))
    count = select(Conversation.id).where(Conversation.user_id == user_id)

    def refuse(ahead):
        raise PermissionError("no")
    for _ in range(3):
        with pytest.raises(PermissionError):
            execute_alone(statement, refuse, first=lock)
        assert db.engine.pool.checkedout() == 0
    for _ in range(3):
        execute_alone(statement, lambda ahead: {"b_user": user_id, "b_now": datetime.now().astimezone()},
                      first=lock)
    assert len(db.session.scalars(count).all()) == 1 + 3
    db.session.rollback()
    # Nothing held: another session takes the same lock at once.
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT pg_try_advisory_lock(42)")).scalar() is True
        connection.execute(text("SELECT pg_advisory_unlock(42)"))


def test_a_connection_that_broke_is_thrown_away(ctx):
    from webapp.extensions import db, execute_alone
    statement = select(text("pg_backend_pid() AS pid"))
    pids = {execute_alone(statement, {})[0].pid for _ in range(3)}
    killer = create_engine(db.engine.url, poolclass=NullPool)  # a connection of no pool the app uses
    with killer.connect() as other:
        for pid in pids:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        other.commit()
    killer.dispose()
    with pytest.raises(exc.OperationalError) as raised:
        execute_alone(statement, {})
    assert raised.value.connection_invalidated
    assert execute_alone(statement, {})[0].pid not in pids  # a new connection, not the dead one again
    assert db.engine.pool.checkedout() == 0


def test_listeners_on_the_engines_statements_see_every_statement(ctx, sa_executes):
    from webapp.extensions import db, execute_alone
    statement = select(text("1 AS one"))
    for _ in range(2):
        execute_alone(statement, {})  # now kept compiled
    seen = []

    def record(connection, cursor, statement, *args):
        seen.append(statement)
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        assert execute_alone(statement, {})[0].one == 1
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert len(seen) == 1


def test_a_statement_with_an_expanding_list_goes_through_sqlalchemy(ctx, sa_executes):
    from webapp.extensions import execute_alone
    from webapp.models import Conversation
    user_id, conversation_id = _with_conversation(ctx)
    statement = select(Conversation.id).where(Conversation.id.in_(bindparam("b_ids", expanding=True)))
    for ids in ([conversation_id], [conversation_id, -1], [-1, -2, conversation_id]):
        assert [row.id for row in execute_alone(statement, {"b_ids": ids})] == [conversation_id]
    assert sa_executes.count(statement) == 3


def test_a_statement_relying_on_python_side_defaults_goes_through_sqlalchemy(ctx, sa_executes):
    """A column default computed in Python (here created_at, system_prompt, message_count) is
    SQLAlchemy's to fill at execution: such a statement never runs straight on psycopg."""
    from webapp.extensions import db, execute_alone
    from webapp.models import Conversation
    user_id, _ = _with_conversation(ctx)
    statement = insert(Conversation).values(user_id=bindparam("b_user"), title="defaults", model="m")
    for _ in range(3):
        execute_alone(statement, {"b_user": user_id})
    assert sa_executes.count(statement) == 3
    rows = db.session.execute(select(Conversation.system_prompt, Conversation.message_count, Conversation.created_at)
                              .where(Conversation.title == "defaults")).all()
    db.session.rollback()
    assert len(rows) == 3 and all(row[0] == "" and row[1] == 0 and row[2] is not None for row in rows)


def test_placeholders_repeated_names_percent_signs_and_long_statements(ctx, sa_executes):
    """The SQL goes to psycopg with PostgreSQL's own $n placeholders: a name used twice is one
    parameter, a literal % stays one, and a statement over psycopg's 4 KiB conversion cache works."""
    from webapp.extensions import execute_alone
    padding = "x" * 5000
    statement = select(text(f"CAST(:v AS integer) + CAST(:v AS integer) AS twice, '5%' AS pct, "
                            f"length('{padding}') AS long, CAST(:w AS text) AS w"))
    for n in range(3):
        (row,) = execute_alone(statement, {"v": n, "w": "%(v)s"})
        assert (row.twice, row.pct, row.long, row.w) == (2 * n, "5%", 5000, "%(v)s")
    assert sa_executes.count(statement) == 1


def test_numeric_columns_come_back_as_sqlalchemy_gives_them(ctx, sa_executes):
    """A numeric column's result processor depends on the type the server sent (known only once the
    statement ran): the direct path asks for it then, and returns what SQLAlchemy returns."""
    from decimal import Decimal

    from sqlalchemy import Float, Numeric, cast, func

    from webapp.extensions import db, execute_alone
    statement = select(cast(bindparam("v"), Numeric(10, 2)).label("money"),
                       cast(bindparam("v"), Float).label("ratio"),
                       func.extract("epoch", func.now()).label("epoch"))
    with db.engine.connect() as connection:
        (expected,) = connection.execute(statement, {"v": "12.5"}).all()
    sa_executes.clear()
    for _ in range(3):
        (row,) = execute_alone(statement, {"v": "12.5"})
        assert (row.money, row.ratio) == (Decimal("12.50"), 12.5)
        assert [type(value) for value in row] == [type(value) for value in expected]
    assert sa_executes.count(statement) == 1
