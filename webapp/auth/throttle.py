"""Sign-in throttling: failed sign-ins are counted, and too many answer 429 until the window passes.

Flask-Limiter (over the `limits` library) keeps the counters. Two limits apply to both doors at once
(the API's POST /auth/login and the sign-in page share one scope, so switching door gains nothing):
- per client address and username (LOGIN_LIMIT_PER_USER): guessing one account's password;
- per client address (LOGIN_LIMIT_PER_ADDRESS): trying one password on many accounts.
Only failures count (`deduct_when`), so people who sign in often are never slowed down. Once a limit
is reached, even the right password is refused until the window moves on; that is what stops guessing.

The counters live in RATELIMIT_STORAGE_URI: `database://` (the default) keeps them in the app's own
database, so every worker and replica counts together (see limit_store.py); `memory://` counts per
worker process; `redis://host:6379` works too.
"""
import math
import time

from flask import current_app, request
from flask_limiter import Limiter

from . import limit_store  # noqa: F401  (registers the database:// storage with `limits`)

limiter = Limiter(key_func=lambda: request.remote_addr or "-", strategy="moving-window")

def _failed(response):
    # 401 is a wrong password on both doors; 422/400 are malformed forms and are not guesses.
    return response.status_code == 401


def _username():
    return (request.form.get("username") or "").strip().lower()


def _per_user_key():
    return f"{request.remote_addr or '-'}|{_username()}"


def _limit(name):
    """Limits are read per request, so tests and operators can change them without re-decorating."""
    return lambda: current_app.config[name]


def _off(name):
    return lambda: request.method != "POST" or not current_app.config.get(name)


def sign_in_limits(view):
    """Decorate a sign-in view (the page or the API) with both failure limits."""
    view = limiter.shared_limit(_limit("LOGIN_LIMIT_PER_USER"), scope="sign-in-user", key_func=_per_user_key,
                                deduct_when=_failed, exempt_when=_off("LOGIN_LIMIT_PER_USER"))(view)
    view = limiter.shared_limit(_limit("LOGIN_LIMIT_PER_ADDRESS"), scope="sign-in-address",
                                deduct_when=_failed, exempt_when=_off("LOGIN_LIMIT_PER_ADDRESS"))(view)
    return view


def sign_up_limit(view):
    """New accounts per client address (SIGNUP_LIMIT_PER_ADDRESS): an open sign-up page is not a
    bot's account factory. Counts accounts made (the redirect after success), not typos in the form."""
    return limiter.limit(_limit("SIGNUP_LIMIT_PER_ADDRESS"), scope="sign-up",
                         deduct_when=lambda response: response.status_code == 302,
                         exempt_when=_off("SIGNUP_LIMIT_PER_ADDRESS"))(view)


def retry_after_seconds():
    """Seconds until the breached limit lets one more attempt through (at least 1)."""
    current = limiter.current_limit
    if current is None:
        return 60
    return max(1, math.ceil(current.reset_at - time.time()))


def wait_in_words(seconds):
    if seconds < 90:
        return f"{seconds} seconds"
    return f"{math.ceil(seconds / 60)} minutes"
