"""Personal API keys: long-lived bearer credentials a person makes for their programs.

A key is `llmk_` + 43 random URL-safe characters (256 bits). The distinctive prefix lets secret
scanners (and people) recognise a leaked key, and lets the API guard tell a key from a JWT without
trying to decode it. The database keeps the key's SHA-256 (a fast hash is right for 256 random bits:
there is nothing to guess) and its first characters (`prefix`) to tell keys apart on the settings page;
the key itself is shown once, when it is made.

Every use looks the row up with its owner (one indexed query), so a key revoked, expired or whose
owner was disabled is refused at once on every worker and replica. Keys survive a password change and
"sign out everywhere" (as GitHub's and OpenAI's do): they end only when revoked, when they expire, or
when the account is disabled. last_used_at is written at most once a minute per key.
"""
import hashlib
import secrets
from datetime import timedelta

from flask import g
from sqlalchemy import bindparam, select, update

from ..errors import ServiceError, invalid, not_found
from ..extensions import db, execute_read, execute_write
from ..limits import API_KEY_DAYS_MAX, API_KEY_NAME_MAX
from ..models import ApiKey, User, detached, utcnow
from ..service.validation import clean_text

PREFIX = "llmk_"
SHOWN_PREFIX = 12  # characters of the key kept in clear to tell keys apart: "llmk_" + 7
TOUCH_EVERY = timedelta(minutes=1)
MAX_KEYS = 100  # live keys per person


class InvalidKey(Exception):
    """The key is unknown, revoked, expired, or its owner cannot sign in."""


def looks_like_key(token):
    return token.startswith(PREFIX)


def _hash(key):
    return hashlib.sha256(key.encode()).hexdigest()


def clean_name(name):
    return clean_text(name, "name", API_KEY_NAME_MAX, allow_empty=False)


def clean_days(days):
    """Days until the key expires: None (never) or 1..API_KEY_DAYS_MAX."""
    if days is None or days == "":
        return None
    if isinstance(days, str) and days.strip().isascii() and days.strip().isdigit():
        days = int(days.strip())
    if isinstance(days, float) and days.is_integer():  # 30.0 is an integer in JSON, as in JSON Schema
        days = int(days)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= API_KEY_DAYS_MAX:
        raise invalid("expires_in_days", f"expires_in_days must be an integer from 1 to {API_KEY_DAYS_MAX}, or null")
    return days


def create(user, name, expires_in_days=None):
    """Make a key; returns (row, key). The key is never stored and cannot be shown again."""
    name, days = clean_name(name), clean_days(expires_in_days)
    live = db.session.scalar(select(db.func.count(ApiKey.id)).where(ApiKey.user_id == user.id,
                                                                     ApiKey.revoked_at.is_(None)))
    if live >= MAX_KEYS:
        raise ServiceError(409, "too_many_keys", f"you have {MAX_KEYS} keys; revoke one first")
    key = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiKey(user_id=user.id, name=name, prefix=key[:SHOWN_PREFIX], key_hash=_hash(key), created_at=now,
                 expires_at=now + timedelta(days=days) if days else None)
    db.session.add(row)
    db.session.commit()
    return row, key


def listed(user_id):
    """The person's keys not revoked (expired ones too, so the page can say so), newest first."""
    return db.session.scalars(select(ApiKey).where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
                              .order_by(ApiKey.id.desc())).all()


def revoke(user_id, key_id):
    """Revoke one of the person's keys; someone else's id is not found."""
    ended = db.session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id,
                                                    ApiKey.revoked_at.is_(None))
                               .values(revoked_at=utcnow())).rowcount
    db.session.commit()
    if not ended:
        raise not_found("API key")


def revoke_by_value(key, user_id=None):
    """Revoke a key given the key itself (RFC 7009 revocation with `token=llmk_...`); with user_id,
    only that person's. True if a live key was ended."""
    statement = update(ApiKey).where(ApiKey.key_hash == _hash(key), ApiKey.revoked_at.is_(None))
    if user_id is not None:
        statement = statement.where(ApiKey.user_id == user_id)
    ended = db.session.execute(statement.values(revoked_at=utcnow())).rowcount
    db.session.commit()
    return ended > 0


def verify(key):
    """The active owner of the key, or InvalidKey saying why not. Writes last_used_at at most once a
    minute. Core, alone (PostgreSQL: no BEGIN; see tokens.verify): the User returned is a plain copy
    of the row, not tracked by the session."""
    params = {"b_key_hash": _hash(key)}
    rows = execute_read(_VERIFY, params)
    if not rows:
        raise InvalidKey("API key is invalid")
    values = rows[0]._asdict()
    record = {name: values.pop("key_" + name) for name in _KEY_FIELDS}
    now = utcnow()
    if record["revoked_at"] is not None:
        raise InvalidKey("API key was revoked")
    if record["expires_at"] is not None and record["expires_at"] <= now:
        raise InvalidKey("API key has expired")
    if not values["is_active"]:
        raise InvalidKey("API key is no longer valid")
    if record["last_used_at"] is None or now - record["last_used_at"] >= TOUCH_EVERY:
        execute_write(_TOUCH, {"b_id": record["id"], "b_now": now})
    g.auth_key_id = record["id"]  # what an open stream re-checks (webapp/stream_auth.py)
    g.api_key_limits = (record["max_running"], record["max_per_minute"])  # see service/fairness.limits_of
    return detached(User, **values)


_KEYS, _USERS = ApiKey.__table__, User.__table__
_KEY_FIELDS = ("id", "revoked_at", "expires_at", "last_used_at", "max_running", "max_per_minute")
_VERIFY = (select(_USERS, *(_KEYS.c[name].label("key_" + name) for name in _KEY_FIELDS))
           .join(_USERS, _USERS.c.id == _KEYS.c.user_id).where(_KEYS.c.key_hash == bindparam("b_key_hash")))
_TOUCH = update(_KEYS).where(_KEYS.c.id == bindparam("b_id")).values(last_used_at=bindparam("b_now")).returning(
    _KEYS.c.id)
