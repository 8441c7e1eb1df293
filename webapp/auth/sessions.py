"""Server-side browser sessions: signing out ends the session on the server, not only in the browser.

Each sign-in makes a row in user_sessions. The (signed) Flask session cookie and the remember-me
cookie carry only a random token whose SHA-256 is the row's token_hash; every request looks the row
up (one primary-key-sized query, joined with the user), so a cookie copied before /logout is
refused after it. Rows end by:
- /logout (that session), a per-session "Sign out" on the settings page,
- "Sign out everywhere" (/logout-all, POST /auth/logout-all) and a password change (every session,
  and token_version is bumped so every bearer token dies too),
- their expiry: issue time + REMEMBER_DAYS, whatever the cookies say.
The remember-me cookie lives no longer than its row and is rotated on use: when it restores a
session, the row gets a new token and both cookies are rewritten, so a stolen copy stops working
the next time the owner's browser uses it (and vice versa).
last_seen_at (with address and browser) is written at most once a minute per session.
"""
import hashlib
import secrets
from datetime import timedelta

from flask import current_app, g, request, session
from flask_login import login_user, user_loaded_from_cookie
from sqlalchemy import bindparam, delete, select, update

from ..extensions import db, execute_read, execute_write
from ..models import User, UserSession, detached, utcnow

TOUCH_EVERY = timedelta(minutes=1)


def _hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def _client():
    return (request.remote_addr or "")[:64] or None, (request.user_agent.string or "")[:256] or None


def lifetime():
    return timedelta(days=current_app.config["REMEMBER_DAYS"])


def start(user, remember=False):
    """Sign `user` in on this browser: a new session row, and the cookies flask-login writes."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    ip, agent = _client()
    # Ended rows are kept a day (the settings page and logs may still refer to them), then go.
    db.session.execute(delete(UserSession).where(
        UserSession.user_id == user.id,
        (UserSession.expires_at < now) | (UserSession.revoked_at < now - timedelta(days=1))))
    db.session.add(UserSession(user_id=user.id, token_hash=_hash(token), remember=bool(remember),
                               created_at=now, last_seen_at=now, expires_at=now + lifetime(),
                               ip=ip, user_agent=agent))
    db.session.commit()
    user.session_token = token
    login_user(user, remember=bool(remember), duration=lifetime() if remember else None)
    g.user_name = user.username


def load(session_id):
    """The user of a session cookie 's:<token>', or None when the session has ended. Every page and
    fragment a browser asks for runs it: one Core read of the session's row joined with its user,
    alone where it can be (extensions.execute_read: no BEGIN, no ROLLBACK at the request's end on a
    page that reads nothing else, and a first message opens its conversation in one statement, as
    the bearer door does). The User returned is a plain copy of the row, as tokens.verify's: a view
    that changes the account loads it (db.session.get) and writes that."""
    kind, _, token = (session_id or "").partition(":")
    if kind != "s" or not token:
        return None  # includes the old 'user_id:version' cookies: those people sign in again
    rows = execute_read(_LOAD, {"b_token_hash": _hash(token)})
    if not rows:
        return None
    values = rows[0]._asdict()
    record = {name: values.pop("s_" + name) for name in _SESSION_FIELDS}
    now = utcnow()
    if record["revoked_at"] is not None or record["expires_at"] <= now or not values["is_active"]:
        return None
    user = detached(User, **values)
    user.session_token = token
    g.user_name = user.username  # for the access log line
    g.user_session_id = record["id"]
    g.auth_user_id = user.id  # with user_session_id: what an open stream re-checks (stream_auth.py)
    g.user_session_expires = record["expires_at"]
    if now - record["last_seen_at"] >= TOUCH_EVERY:
        ip, agent = _client()
        execute_write(_TOUCH, {"b_id": record["id"], "b_now": now, "b_ip": ip, "b_agent": agent})
    return user


_SESSIONS = UserSession.__table__
_SESSION_FIELDS = ("id", "revoked_at", "expires_at", "last_seen_at")  # read beside the user's row, as s_<name>
_LOAD = (select(*(_SESSIONS.c[name].label("s_" + name) for name in _SESSION_FIELDS), User.__table__)
         .join(User.__table__, User.__table__.c.id == _SESSIONS.c.user_id)
         .where(_SESSIONS.c.token_hash == bindparam("b_token_hash")))
_TOUCH = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("b_id"))
          .values(last_seen_at=bindparam("b_now"), ip=bindparam("b_ip"), user_agent=bindparam("b_agent"))
          .returning(_SESSIONS.c.id))  # RETURNING: a write run alone fetches its rows


def current_id():
    return g.get("user_session_id")


def end_current():
    """Revoke this browser's session row (sign-out)."""
    session_id = current_id()
    if session_id is not None:
        revoke(session_id)


def revoke(session_id, user_id=None):
    """End one session; with user_id, only if it belongs to that user. True if one was ended."""
    statement = update(UserSession).where(UserSession.id == session_id, UserSession.revoked_at.is_(None))
    if user_id is not None:
        statement = statement.where(UserSession.user_id == user_id)
    ended = db.session.execute(statement.values(revoked_at=utcnow())).rowcount
    db.session.commit()
    return ended > 0


def revoke_all(user_id, keep=None):
    """End every session of the user (but `keep`, when given). Does not commit."""
    statement = update(UserSession).where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
    if keep is not None:
        statement = statement.where(UserSession.id != keep)
    db.session.execute(statement.values(revoked_at=utcnow()))


def active(user_id):
    now = utcnow()
    return db.session.scalars(select(UserSession).where(
        UserSession.user_id == user_id, UserSession.revoked_at.is_(None), UserSession.expires_at > now)
        .order_by(UserSession.last_seen_at.desc())).all()


def _rotate_remembered(app, user):
    """The remember cookie restored a session: give the row a new token and rewrite both cookies,
    never beyond the row's own expiry (bound to its issue time)."""
    session_id = g.get("user_session_id")
    if session_id is None:
        return
    token = secrets.token_urlsafe(32)
    db.session.execute(update(UserSession).where(UserSession.id == session_id).values(token_hash=_hash(token)))
    db.session.commit()
    user.session_token = token
    session["_user_id"] = user.get_id()
    session["_remember"] = "set"
    remaining = (g.user_session_expires - utcnow()).total_seconds()
    session["_remember_seconds"] = max(1, int(remaining))


def device_name(user_agent):
    """A short human name for a browser, from its User-Agent (good enough to tell devices apart)."""
    agent = user_agent or ""
    browser = next((name for key, name in (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"),
                                            ("Chrome/", "Chrome"), ("Safari/", "Safari"), ("curl/", "curl"),
                                            ("python-requests", "Python requests")) if key in agent), None)
    system = next((name for key, name in (("Android", "Android"), ("iPhone", "iPhone"), ("iPad", "iPad"),
                                           ("Windows", "Windows"), ("Mac OS X", "macOS"), ("Linux", "Linux"))
                   if key in agent), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or (agent[:40] if agent else "Unknown browser")


def init_sessions(app):
    user_loaded_from_cookie.connect(_rotate_remembered, app)
