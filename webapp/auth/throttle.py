"""Throttling of sign-in, sign-up and password checks: limits taken before the work, counted by outcome.

How it counts
- Increment, then check, before the work: every attempt takes a hit from its limits *before* the
  password is hashed or the account made (`limits`' moving-window `hit()`, atomic in the store), so
  40 simultaneous wrong passwords against a limit of 10 let exactly 10 reach the hash and answer
  429 to the other 30. The old way (check before, count after the response) let whole bursts through.
- By outcome, not by HTTP status: the view says how it went. A right password gives its hits back
  (`Attempt.succeeded()`), so people who sign in often are never slowed down; a wrong one keeps them.
  Changing a door's status codes (the token endpoint's 400 invalid_grant) changes nothing here.
  Malformed requests (a missing field, passwords that do not match) are refused before any limit is
  taken: they are typos, not guesses.

Who is limited, and why not one wall per address
- per username, from anywhere (LOGIN_LIMIT_PER_USER, default 10/minute and 50/hour): guessing one
  account's password, from one address or a botnet;
- per client address (LOGIN_LIMIT_PER_ADDRESS, default 100/hour): trying a password on many accounts;
- known devices pass both. A successful sign-in leaves a signed `device` cookie naming the account;
  an attempt for that account carrying it is counted against that device alone (the per-user limit,
  keyed by the device). So one abuser behind a shared address (an office, a NAT, a phone carrier)
  who burns the address limit, or who hammers a colleague's username, locks out only browsers that
  have never signed in to that account: people who have signed in there before keep signing in,
  right password included. An attacker cannot mint such a cookie (it is signed with SECRET_KEY and
  names one account), and a stolen one still only buys the per-user rate, for that one account.
  This is the "device cookie" defence OWASP describes for brute-force protection; a flat wall per
  address (what we had) is the denial of service issue 9 reported.
- sign-up (SIGNUP_LIMIT_PER_ADDRESS, default 5/hour): every well-formed attempt counts, whether it
  makes an account or finds the name taken, so "does alice exist?" probing is throttled while a
  person who picks a taken name is still told so.
- token revocation (REVOKE_LIMIT_PER_ADDRESS, default 60/minute): every well-formed request, so it
  cannot be used to look up keys or tokens at volume (its answer is 200 for any token anyway);
- the settings page's current-password check: per account (the per-user limit), right answers
  given back.

The counters live in RATELIMIT_STORAGE_URI: `database://` (the default) keeps them in the app's own
database (limit_store.py, on a small pool of its own), so every worker and replica counts together;
`memory://` counts per worker process. If the store fails (a database hiccup, a missed migration)
the limit fails open: the attempt goes on unthrottled and a warning goes to the app's log. Locking
everyone out because a counter table is missing would be worse than a brief gap in the limit.
"""
import logging
import math
import secrets
import time

from flask import after_this_request, current_app, request
from itsdangerous import BadSignature, URLSafeSerializer
from limits import parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.exc import TimeoutError as PoolTimeout

from . import limit_store  # noqa: F401  (registers the database:// storage with `limits`)
from .hashing import Busy

log = logging.getLogger("webapp.auth.throttle")
DEVICE_COOKIE = "device"
DEVICE_COOKIE_DAYS = 365


class Throttled(Exception):
    """Too many attempts: answer 429 with Retry-After. `kind` is sign-in, sign-up or password."""

    def __init__(self, retry_after, kind):
        super().__init__(f"too many {kind} attempts; retry after {retry_after} s")
        self.retry_after, self.kind = retry_after, kind


def init_throttle(app):
    storage = storage_from_string(app.config["RATELIMIT_STORAGE_URI"])
    app.extensions["auth_limits"] = MovingWindowRateLimiter(storage)


def _limiter():
    return current_app.extensions["auth_limits"]


def _items(name):
    value = (current_app.config.get(name) or "").strip()
    return parse_many(value) if value else []


def _address():
    return request.remote_addr or "-"


class Attempt:
    """Hits taken for one attempt; `succeeded()` gives them back (the attempt does not count)."""

    def __init__(self, taken):
        self.taken = taken

    def succeeded(self):
        for item, key in self.taken:
            _refund(item.key_for(key))
        self.taken = []

    cancel = succeeded  # the attempt never happened (the server was too busy to check it)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        from .hashing import Busy
        if isinstance(exc, Busy):
            self.cancel()
        return False


def _refund(full_key):
    storage = _limiter().storage
    try:
        if isinstance(storage, MemoryStorage):
            with storage.locks[full_key]:
                if storage.events.get(full_key):
                    storage.events[full_key].pop(0)
        elif hasattr(storage, "refund"):
            storage.refund(full_key)
    except Exception:  # noqa: BLE001  (fail open, but say so)
        log.warning("limit store failed while giving back a hit; the attempt stays counted", exc_info=True)


def take(pairs, kind):
    """Take one hit from each (limit, key); all or nothing. Raises Throttled when one is used up."""
    limiter, taken = _limiter(), []
    for item, key in pairs:
        try:
            allowed = limiter.hit(item, key)
        except PoolTimeout:
            # The store's few connections are all busy (a burst): answer 503, count nothing.
            Attempt(taken).cancel()
            raise Busy() from None
        except Exception as exc:  # noqa: BLE001
            log.warning("limit store failed (%s: %s); %s attempts are not throttled until it works again",
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "", kind)
            continue
        if not allowed:
            Attempt(taken).succeeded()  # the hits taken from the other limits go back
            raise Throttled(_retry_after(item, key), kind)
        taken.append((item, key))
    return Attempt(taken)


def _retry_after(item, key):
    try:
        reset = _limiter().get_window_stats(item, key).reset_time
    except Exception:  # noqa: BLE001
        return 60
    return max(1, math.ceil(reset - time.time()))


# --- who is asking ---------------------------------------------------------------------------------

def _serializer():
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="known-device")


def known_device(username):
    """The id of this browser's device cookie when it names `username`, else None."""
    raw = request.cookies.get(DEVICE_COOKIE)
    if not raw:
        return None
    try:
        data = _serializer().loads(raw)
    except BadSignature:
        return None
    if isinstance(data, dict) and data.get("u") == username and isinstance(data.get("d"), str):
        return data["d"]
    return None


def remember_device(username):
    """After a right password: mark this browser (or program with a cookie jar) as a known device."""
    value = _serializer().dumps({"u": username, "d": known_device(username) or secrets.token_urlsafe(12)})

    @after_this_request
    def set_cookie(response):
        response.set_cookie(DEVICE_COOKIE, value, max_age=DEVICE_COOKIE_DAYS * 86400, httponly=True,
                            samesite="Lax", secure=current_app.config.get("SESSION_COOKIE_SECURE", False))
        return response


# --- the limits ------------------------------------------------------------------------------------

def sign_in(username):
    """Take the sign-in limits for `username` (both doors share them). Returns the Attempt."""
    name = (username or "").strip().lower() if isinstance(username, str) else ""
    device = known_device(name) if name else None
    if device:
        pairs = [(item, f"sign-in-device|{device}") for item in _items("LOGIN_LIMIT_PER_USER")]
    else:
        pairs = ([(item, f"sign-in-user|{name}") for item in _items("LOGIN_LIMIT_PER_USER")]
                 + [(item, f"sign-in-address|{_address()}") for item in _items("LOGIN_LIMIT_PER_ADDRESS")])
    return take(pairs, "sign-in")


def sign_up():
    """Every well-formed sign-up attempt, made or refused as taken, counts against the address."""
    return take([(item, f"sign-up|{_address()}") for item in _items("SIGNUP_LIMIT_PER_ADDRESS")], "sign-up")


def revocation():
    """Token revocation (RFC 7009), per client address: every well-formed request counts, whatever the
    token was, so the limit cannot tell a live token from a dead one, and nobody can make the server
    look up keys at volume."""
    return take([(item, f"revoke|{_address()}") for item in _items("REVOKE_LIMIT_PER_ADDRESS")], "revocation")


def password_check(user_id):
    """The settings page's current-password check, per account. The request's session is closed
    first (its connection goes back), so it never holds one connection while waiting for another."""
    from ..extensions import db
    db.session.close()
    return take([(item, f"password-check|{user_id}") for item in _items("LOGIN_LIMIT_PER_USER")], "password")


def wait_in_words(seconds):
    if seconds < 90:
        return f"{seconds} seconds"
    return f"{math.ceil(seconds / 60)} minutes"
