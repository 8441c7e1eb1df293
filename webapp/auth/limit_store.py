"""A storage for the `limits` library in the app's own database (RATELIMIT_STORAGE_URI=database://).

The limits must hold across gunicorn workers and app replicas; the one thing they all share is the
database, so the counted attempts are rows there (table rate_limit_hits) rather than in each
process's memory or in a Redis the deployment would not otherwise need. Only the moving-window
strategy is supported: a window is "the hits of this key in the last `expiry` seconds".

Connections: the store has its own tiny pool (LIMIT_STORE_CONNECTIONS, default 2, per process),
apart from the request pool. Under a burst every sign-in queues on these few connections (and on the
per-key lock) without holding a connection of the request pool, so signed-in people's requests
always find one; views take their limits before touching the request's session at all (the
settings page closes its session first), so no request holds one pooled connection while waiting
for another. The old store borrowed from the request pool after the response, and a burst of
sign-ins emptied it ("QueuePool limit ... reached" for everyone). A request that cannot get a store
connection within LIMIT_STORE_TIMEOUT seconds is answered 503 with Retry-After (throttle.py).

Atomicity: `acquire_entry` (what `hit()` calls) counts and inserts under a per-key lock, so N
simultaneous attempts against a limit of L let exactly L through: on PostgreSQL a transaction-scoped
advisory lock on the key, on SQLite the database's single writer (the first statement is a write).
"""
import hashlib
import threading
import time

from flask import current_app
from limits.storage import MovingWindowSupport, Storage
from sqlalchemy import create_engine, delete, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from ..capacity import install_sqlite_write_gate
from ..models import RateLimitHit

_engine_lock = threading.Lock()
ENGINE_KEY = "auth_limit_engine"


def store_engine(app=None):
    """This app's own small engine for the counters, made on first use (in the worker, after fork)."""
    app = app or current_app._get_current_object()
    engine = app.extensions.get(ENGINE_KEY)
    if engine is None:
        with _engine_lock:
            engine = app.extensions.get(ENGINE_KEY)
            if engine is None:
                options = app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {}
                extra = {"connect_args": options["connect_args"]} if "connect_args" in options else {}
                engine = app.extensions[ENGINE_KEY] = create_engine(
                    app.config["SQLALCHEMY_DATABASE_URI"], pool_size=max(1, app.config["LIMIT_STORE_CONNECTIONS"]),
                    max_overflow=0, pool_timeout=app.config["LIMIT_STORE_TIMEOUT"], pool_pre_ping=True,
                    **extra)
                install_sqlite_write_gate(engine)  # SQLite under gevent: wait for the write lock cooperatively
    return engine

HITS = RateLimitHit.__table__


def _digest(key):
    return hashlib.sha256(key.encode()).hexdigest()


def _lock(conn, digest):
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int(digest[:15], 16)})


class DatabaseStorage(Storage, MovingWindowSupport):
    STORAGE_SCHEME = ["database"]

    def __init__(self, uri=None, wrap_exceptions=False, **options):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self):
        return SQLAlchemyError

    def acquire_entry(self, key, limit, expiry, amount=1):
        if amount > limit:
            return False
        now, digest = time.time(), _digest(key)
        with store_engine().begin() as conn:
            conn.execute(delete(HITS).where(HITS.c.expires_at < now))  # indexed; keeps the table small
            _lock(conn, digest)
            count = conn.scalar(select(func.count()).where(HITS.c.key == digest, HITS.c.at > now - expiry))
            if count + amount > limit:
                return False
            conn.execute(insert(HITS), [{"key": digest, "at": now, "expires_at": now + expiry}] * amount)
        return True

    def refund(self, key):
        """Take back the newest hit of `key` (an attempt that turned out not to count)."""
        digest = _digest(key)
        newest = select(HITS.c.id).where(HITS.c.key == digest).order_by(HITS.c.at.desc()).limit(1).scalar_subquery()
        with store_engine().begin() as conn:
            conn.execute(delete(HITS).where(HITS.c.id == newest))

    def get_moving_window(self, key, limit, expiry):
        now = time.time()
        with store_engine().connect() as conn:
            oldest, count = conn.execute(select(func.min(HITS.c.at), func.count()).where(
                HITS.c.key == _digest(key), HITS.c.at > now - expiry)).one()
        return (oldest, count) if count else (now, 0)

    def check(self):
        with store_engine().connect() as conn:
            conn.execute(select(1))
        return True

    def clear(self, key):
        with store_engine().begin() as conn:
            conn.execute(delete(HITS).where(HITS.c.key == _digest(key)))

    def reset(self):
        with store_engine().begin() as conn:
            return conn.execute(delete(HITS)).rowcount

    # Fixed-window counters are not used (the limiter runs the moving-window strategy).
    def incr(self, key, expiry, amount=1):
        raise NotImplementedError("the database storage supports the moving-window strategy only")

    def get(self, key):
        raise NotImplementedError("the database storage supports the moving-window strategy only")

    def get_expiry(self, key):
        raise NotImplementedError("the database storage supports the moving-window strategy only")
