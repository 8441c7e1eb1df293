"""webapp/db_ping.py on the real PostgreSQL: a connection idle for a while is checked and replaced
when dead; one used a moment ago goes straight back to work, without a round trip."""
import time

import psycopg
import pytest
from sqlalchemy import create_engine, text


@pytest.fixture
def engine(pg_url):
    engine = create_engine(pg_url, pool_size=1, max_overflow=0)
    pings = []
    ping = engine.dialect.do_ping

    def counting_ping(dbapi_connection):
        pings.append(1)
        return ping(dbapi_connection)
    engine.dialect.do_ping = counting_ping
    engine.pings = pings
    yield engine
    engine.dispose()


def backend_pid(engine):
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar()


def test_a_connection_used_a_moment_ago_is_not_pinged(engine):
    from webapp import db_ping
    db_ping.install(engine, after_idle=60)
    first = backend_pid(engine)
    assert backend_pid(engine) == backend_pid(engine) == first  # the same connection, reused
    assert engine.pings == []


def test_a_dead_idle_connection_is_replaced_before_use(engine, pg_url):
    from webapp import db_ping
    db_ping.install(engine, after_idle=0)
    dead = backend_pid(engine)
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (dead,))
        for _ in range(100):  # the backend exits a moment after the signal
            if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (dead,)).fetchone():
                break
            time.sleep(0.02)
    assert backend_pid(engine) != dead  # no error reached the caller: a fresh connection served it
    assert engine.pings  # it was checked, found dead, and replaced
