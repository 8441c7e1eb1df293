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


def test_a_dead_idle_connection_renews_the_whole_pool_as_a_restart_killed_them_all(pg_url):
    """A server restart kills every connection, the one used a moment ago (never pinged) too: the
    first dead idle one found invalidates the pool, so the other does not fail its statement."""
    from webapp import db_ping
    engine = create_engine(pg_url, pool_size=2, max_overflow=0)
    try:
        db_ping.install(engine, after_idle=0.5)
        idle, recent = engine.connect(), engine.connect()
        pids = [conn.execute(text("SELECT pg_backend_pid()")).scalar() for conn in (idle, recent)]
        idle.close()          # back in the pool first: it will be idle long enough to be pinged
        time.sleep(0.6)
        recent.close()        # used a moment ago: not pinged
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(100):
                if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone():
                    break
                time.sleep(0.02)
        with engine.connect() as first, engine.connect() as second:  # both checked out at once
            served = [conn.execute(text("SELECT pg_backend_pid()")).scalar() for conn in (first, second)]
        assert not set(served) & set(pids)
    finally:
        engine.dispose()
