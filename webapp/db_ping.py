"""Checking a pooled database connection before use, only when it may have gone stale.

SQLAlchemy's `pool_pre_ping` sends a `SELECT 1` on every checkout: one more round trip for every
request and every background write, two per turn. A connection that was in use a moment ago is not
the one a PostgreSQL restart, a proxy's idle timeout or a firewall silently dropped, so here only a
connection idle for more than PING_AFTER_IDLE seconds is pinged; a dead one is replaced before the
caller sees it (SQLAlchemy's documented pessimistic pattern: DisconnectionError on checkout makes
the pool discard it and try another). A connection that dies while busy fails its statement as it
would with a pre-ping too, and SQLAlchemy then invalidates every older connection of the pool.
"""
import time

from sqlalchemy import event, exc

PING_AFTER_IDLE = 5.0  # seconds: under load connections never idle this long, so they are never pinged


def install(engine, after_idle=PING_AFTER_IDLE):
    """Ping on checkout after `after_idle` seconds idle. PostgreSQL only (SQLite has no server to lose)."""
    if engine.dialect.name == "sqlite" or getattr(engine, "_idle_ping", False):
        return
    engine._idle_ping = True
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, proxy):
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since <= after_idle:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as error:  # dead: the pool drops it and checks out another
            raise exc.DisconnectionError(f"connection idle {time.monotonic() - idle_since:.0f} s was dead") from error
