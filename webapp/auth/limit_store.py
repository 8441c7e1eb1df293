"""A storage for the `limits` library in the app's own database (RATELIMIT_STORAGE_URI=database://).

The limits must hold across gunicorn workers and app replicas; the one thing they all share is the
database, so the counted attempts are rows there (table rate_limit_hits) rather than in each
process's memory or in a Redis the deployment would not otherwise need. Only the moving-window
strategy is supported: a window is "the hits of this key in the last `expiry` seconds".

Connections: every call runs on the request's own session (db.session), in a short transaction of
its own that is committed before the view goes on; views take their limits before any password
hash, so a request never holds one pooled connection while asking for a second (the old store
opened its own connection after the response, which under a burst of sign-ins emptied the pool).

Atomicity: `acquire_entry` (what `hit()` calls) counts and inserts under a per-key lock, so N
simultaneous attempts against a limit of L let exactly L through: on PostgreSQL a transaction-scoped
advisory lock on the key, on SQLite the database's single writer (the first statement is a write).
"""
import hashlib
import time

from limits.storage import MovingWindowSupport, Storage
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from ..extensions import db
from ..models import RateLimitHit

HITS = RateLimitHit.__table__


def _digest(key):
    return hashlib.sha256(key.encode()).hexdigest()


def _lock(session, digest):
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int(digest[:15], 16)})


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
        now, digest, session = time.time(), _digest(key), db.session
        session.commit()  # whatever the request read so far; the hit gets a transaction of its own
        try:
            session.execute(delete(HITS).where(HITS.c.expires_at < now))  # indexed; keeps the table small
            _lock(session, digest)
            count = session.scalar(select(func.count()).where(HITS.c.key == digest, HITS.c.at > now - expiry))
            if count + amount > limit:
                session.commit()
                return False
            session.execute(insert(HITS), [{"key": digest, "at": now, "expires_at": now + expiry}] * amount)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return True

    def refund(self, key):
        """Take back the newest hit of `key` (an attempt that turned out not to count)."""
        digest = _digest(key)
        newest = select(HITS.c.id).where(HITS.c.key == digest).order_by(HITS.c.at.desc()).limit(1).scalar_subquery()
        try:
            db.session.execute(delete(HITS).where(HITS.c.id == newest))
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise

    def get_moving_window(self, key, limit, expiry):
        now = time.time()
        oldest, count = db.session.execute(select(func.min(HITS.c.at), func.count()).where(
            HITS.c.key == _digest(key), HITS.c.at > now - expiry)).one()
        db.session.rollback()
        return (oldest, count) if count else (now, 0)

    def check(self):
        db.session.execute(select(1))
        return True

    def clear(self, key):
        db.session.execute(delete(HITS).where(HITS.c.key == _digest(key)))
        db.session.commit()

    def reset(self):
        count = db.session.execute(delete(HITS)).rowcount
        db.session.commit()
        return count

    # Fixed-window counters are not used (the limiter runs the moving-window strategy).
    def incr(self, key, expiry, amount=1):
        raise NotImplementedError("the database storage supports the moving-window strategy only")

    def get(self, key):
        raise NotImplementedError("the database storage supports the moving-window strategy only")

    def get_expiry(self, key):
        raise NotImplementedError("the database storage supports the moving-window strategy only")
