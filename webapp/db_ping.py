"""Checking a pooled database connection before use, only when it may have gone stale.

SQLAlchemy's `pool_pre_ping` sends a `SELECT 1` on every checkout: one more round trip for every
request and every background write, two per turn. Connections a proxy's idle timeout or a firewall
silently drops are idle ones, so here only a connection idle for more than PING_AFTER_IDLE seconds
is pinged; a dead one is replaced before the caller sees it (SQLAlchemy's documented pessimistic
pattern), and because a dead idle connection usually means the server restarted, which kills every
connection, it raises InvalidatePoolError (what pool_pre_ping does too): the pool discards every
connection older than now, busy ones at their check-in, so a restart costs one failed ping, not one
failed statement per pooled connection. A connection that dies while busy fails its statement as
it would with a pre-ping too, and SQLAlchemy then invalidates every older connection of the pool.
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
        except Exception as error:  # dead: the pool drops it (and every older one) and checks out another
            raise exc.InvalidatePoolError(f"connection idle {time.monotonic() - idle_since:.0f} s was dead") from error
