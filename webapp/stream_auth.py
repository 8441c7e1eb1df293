"""Open streams end soon after their credentials do (sign-out everywhere, a password change, a
revoked token, an ended browser session, a disabled account), without a query per stream.

A stream takes a `watch()` when it starts: the user id and what it was authorised with (a bearer
token's token_version, or a browser session's id). Each worker process has one background task that,
while any stream is open there, re-checks every watched user with ONE query each RECHECK_SECONDS
(users left-joined with the watched sessions) and marks the watches whose credential has ended. A
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
from sqlalchemy import and_, select

from . import sse
from .extensions import db
from .models import User, UserSession, utcnow

log = logging.getLogger(__name__)
RECHECK_SECONDS = 2.0  # DESIGN: one query per worker per tick, <= 5 s


class Watch:
    """One open stream's credential. `version`: the bearer token's token_version (None: not a token);
    `session_id`: the browser session's row (None: not a browser)."""

    def __init__(self, user_id, version=None, session_id=None):
        self.user_id, self.version, self.session_id = user_id, version, session_id
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


def watch(user_id=None, version=None, session_id=None):
    """Register the current request's stream (its credential comes from the request unless given:
    guard.token_required and auth/sessions.load record it in `g`). Keep the returned object for as
    long as the stream runs."""
    if user_id is None:
        user_id = g.get("auth_user_id")
        if user_id is None:
            return _Unwatched()
        version, session_id = g.get("auth_token_version"), g.get("user_session_id")
    if version is None and session_id is None:
        return _Unwatched()
    item = Watch(user_id, version, session_id)
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
        """ONE query for every watched user and session of this process."""
        user_ids = {item.user_id for item in items}
        session_ids = {item.session_id for item in items if item.session_id is not None}
        rows = db.session.execute(
            select(User.id, User.is_active, User.token_version, UserSession.id, UserSession.revoked_at,
                   UserSession.expires_at)
            .outerjoin(UserSession, and_(UserSession.user_id == User.id, UserSession.id.in_(session_ids)))
            .where(User.id.in_(user_ids))).all()
        now = utcnow()
        users = {row[0]: (row[1], row[2]) for row in rows}
        live_sessions = {row[3] for row in rows if row[3] is not None and row[4] is None and row[5] > now}
        for item in items:
            active, version = users.get(item.user_id, (False, None))
            if not active:
                item.reason = "account_disabled"
            elif ((item.version is not None and item.version != version)
                  or (item.session_id is not None and item.session_id not in live_sessions)):
                item.reason = "signed_out"
