"""A storage for the `limits` library in the app's own database (RATELIMIT_STORAGE_URI=database://).

The sign-in limits must hold across gunicorn workers and app replicas; the one thing they all share
is the database, so the failed attempts are rows there (table rate_limit_hits) rather than in each
process's memory or in a Redis the deployment would not otherwise need. Only the moving-window
strategy is supported: a window is "the hits of this key in the last `expiry` seconds".
Each call runs on its own short connection, apart from the request's session and transaction.
"""
import hashlib
import time

from limits.storage import MovingWindowSupport, Storage
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from ..extensions import db
from ..models import RateLimitHit

HITS = RateLimitHit.__table__


def _digest(key):
    return hashlib.sha256(key.encode()).hexdigest()


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
        with db.engine.begin() as conn:
            conn.execute(delete(HITS).where(HITS.c.expires_at < now))  # indexed; keeps the table small
            count = conn.scalar(select(func.count()).where(HITS.c.key == digest, HITS.c.at > now - expiry))
            if count + amount > limit:
                return False
            conn.execute(insert(HITS), [{"key": digest, "at": now, "expires_at": now + expiry}] * amount)
        return True

    def get_moving_window(self, key, limit, expiry):
        now = time.time()
        with db.engine.connect() as conn:
            oldest, count = conn.execute(select(func.min(HITS.c.at), func.count()).where(
                HITS.c.key == _digest(key), HITS.c.at > now - expiry)).one()
        return (oldest, count) if count else (now, 0)

    def check(self):
        with db.engine.connect() as conn:
            conn.execute(select(1))
        return True

    def clear(self, key):
        with db.engine.begin() as conn:
            conn.execute(delete(HITS).where(HITS.c.key == _digest(key)))

    def reset(self):
        with db.engine.begin() as conn:
            return conn.execute(delete(HITS)).rowcount

    # Fixed-window counters are not used (the limiter runs the moving-window strategy).
    def incr(self, key, expiry, amount=1):
        raise NotImplementedError("the database storage supports the moving-window strategy only")

    def get(self, key):
        raise NotImplementedError("the database storage supports the moving-window strategy only")

    def get_expiry(self, key):
        raise NotImplementedError("the database storage supports the moving-window strategy only")
