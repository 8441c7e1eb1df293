"""Open streams end soon after their credentials do (sign-out everywhere, a password change, a
revoked token, an ended browser session, a disabled account), without a query per stream.

A stream takes a `watch()` when it starts: the user id and what it was authorised with (a bearer
token's token_version and jti, a personal API key's row, or a browser session's id). Each worker
process has one background task that, while any stream is open there, re-checks every watched
credential with ONE query each RECHECK_SECONDS (the watched users, sessions, keys and revoked token
ids, as one UNION ALL) and marks the watches whose credential has ended. A
stream asks `watch.still_allowed()` on each tick of its loop (service.follow() yields at least every
~0.3 s) and, when it is no longer allowed, sends `watch.ended()` (an SSE `signed_out` event) and stops.
So a stream ends within RECHECK_SECONDS plus one tick (< 3 s) of its user being signed out anywhere.

Watches are held weakly: a stream that ends or whose client goes away drops its watch with its
generator frame, and the task stops when none are left (it starts again with the next stream).
"""
import logging
import threading
import time
import weakref

from flask import current_app, g
from sqlalchemy import Boolean, Integer, String, cast, literal, null, select, union_all

from . import sse
from .extensions import db
from .models import ApiKey, RevokedToken, User, UserSession, UTCDateTime, utcnow

log = logging.getLogger(__name__)
RECHECK_SECONDS = 2.0  # DESIGN: one query per worker per tick, <= 5 s


class Watch:
    """One open stream's credential. `version` and `jti`: the bearer token's token_version and id
    (None: not a token); `key_id`: the API key's row (None: not a key); `session_id`: the browser
    session's row (None: not a browser)."""

    def __init__(self, user_id, version=None, session_id=None, jti=None, key_id=None):
        self.user_id, self.version, self.session_id = user_id, version, session_id
        self.jti, self.key_id = jti, key_id
        self.reason = None  # set by the checker: "signed_out" or "account_disabled"

    def still_allowed(self):
        return self.reason is None

    def ended(self):
        """The last frame of a stream whose credential has ended."""
        words = ("this account has been disabled" if self.reason == "account_disabled"
                 else "signed out: this sign-in is no longer valid")
        return sse.event("signed_out", {"code": self.reason or "signed_out", "message": words})


class _Unwatched(Watch):
    """No credential known (nothing to re-check): always allowed."""

    def __init__(self):
        super().__init__(None)


def watch(user_id=None, version=None, session_id=None, jti=None, key_id=None):
    """Register the current request's stream (its credential comes from the request unless given:
    guard.bearer_user and auth/sessions.load record it in `g`). Keep the returned object for as
    long as the stream runs."""
    if user_id is None:
        user_id = g.get("auth_user_id")
        if user_id is None:
            return _Unwatched()
        version, session_id = g.get("auth_token_version"), g.get("user_session_id")
        jti, key_id = g.get("auth_jti"), g.get("auth_key_id")
    if version is None and session_id is None and key_id is None:
        return _Unwatched()
    item = Watch(user_id, version, session_id, jti, key_id)
    _watcher(current_app._get_current_object()).add(item)
    return item


def _watcher(app):
    watcher = app.extensions.get("stream_auth")
    if watcher is None:
        watcher = app.extensions.setdefault("stream_auth", _Watcher(app))
    return watcher


class _Watcher:
    """This process's watches and the one task that re-checks them."""

    def __init__(self, app):
        self.app = app
        self.watches = weakref.WeakSet()
        self.lock = threading.Lock()
        self.task = None

    def add(self, item):
        from .generation import spawn  # the one place that decides what a background task is
        with self.lock:
            self.watches.add(item)
            if self.task is None:
                self.task = spawn(self._run, name="stream-auth")

    def _run(self):
        with self.app.app_context():
            while True:
                time.sleep(RECHECK_SECONDS)
                with self.lock:
                    items = [item for item in self.watches if item.reason is None]
                    if not items:
                        self.task = None
                        return
                try:
                    self.check(items)
                except Exception:  # a database hiccup: try again next tick, never kill the task
                    log.exception("re-checking open streams failed")
                    db.session.rollback()
                finally:
                    db.session.close()
                    del items  # hold no stream's watch while sleeping

    @staticmethod
    def check(items):
        """ONE query for every watched user, session, API key and token of this process."""
        rows = db.session.execute(_recheck_query(items)).all()
        now = utcnow()
        users = {row.num: (row.active, row.version) for row in rows if row.kind == "u"}
        live = {(row.kind, row.num) for row in rows
                if row.kind in ("s", "k") and row.revoked_at is None
                and (row.expires_at is None or row.expires_at > now)}
        revoked_jtis = {row.text for row in rows if row.kind == "t"}
        for item in items:
            active, version = users.get(item.user_id, (False, None))
            if not active:
                item.reason = "account_disabled"
            elif ((item.version is not None and item.version != version)
                  or (item.jti is not None and item.jti in revoked_jtis)
                  or (item.session_id is not None and ("s", item.session_id) not in live)
                  or (item.key_id is not None and ("k", item.key_id) not in live)):
                item.reason = "signed_out"


def _recheck_query(items):
    """Tagged rows, one statement: 'u' users (active, token_version), 's' sessions and 'k' keys
    (revoked_at, expires_at), 't' revoked token ids. Linear in the watches (a join of the four would
    multiply one user's sessions by their keys and tokens)."""
    def row(kind, num=None, text=None, active=None, version=None, revoked_at=None, expires_at=None):
        def typed(value, kind_of, name):
            return (value if value is not None else cast(null(), kind_of)).label(name)
        return (literal(kind, String).label("kind"), typed(num, Integer, "num"), typed(text, String, "text"),
                typed(active, Boolean, "active"), typed(version, Integer, "version"),
                typed(revoked_at, UTCDateTime, "revoked_at"), typed(expires_at, UTCDateTime, "expires_at"))

    def ids(name):
        return {getattr(item, name) for item in items if getattr(item, name) is not None}

    parts = [select(*row("u", num=User.id, active=User.is_active, version=User.token_version))
             .where(User.id.in_(ids("user_id")))]
    if ids("session_id"):
        parts.append(select(*row("s", num=UserSession.id, revoked_at=UserSession.revoked_at,
                                 expires_at=UserSession.expires_at)).where(UserSession.id.in_(ids("session_id"))))
    if ids("key_id"):
        parts.append(select(*row("k", num=ApiKey.id, revoked_at=ApiKey.revoked_at, expires_at=ApiKey.expires_at))
                     .where(ApiKey.id.in_(ids("key_id"))))
    if ids("jti"):
        parts.append(select(*row("t", text=RevokedToken.jti)).where(RevokedToken.jti.in_(ids("jti"))))
    return union_all(*parts) if len(parts) > 1 else parts[0]
