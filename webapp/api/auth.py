"""POST /auth/login: the token endpoint of the OAuth2 password grant (RFC 6749 §4.3), as a form.

Success and failure follow RFC 6749 §5 so that OAuth2 libraries understand them: the token answer is
never cached (`Cache-Control: no-store`, `Pragma: no-cache`), and every refusal is
`{"error": <RFC code>, "error_description", "request_id"}` — 400 `invalid_request` for a missing or
repeated parameter, 400 `invalid_grant` for a wrong username or password, 400
`unsupported_grant_type` for any grant but `password` (which may be omitted, as the seed's FastAPI
form allowed), 429 `too_many_attempts` with `Retry-After` while sign-ins are throttled, and 503
`temporarily_unavailable` with `Retry-After` while too many sign-ins wait for the password pool.
"""
from flask import g, jsonify, request

from ..auth import throttle, tokens
from ..auth.accounts import authenticate, revoke_all
from ..auth.hashing import Busy
from . import bp
from .guard import token_required

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def token_error(status, error, description, **extra):
    response = jsonify({"error": error, "error_description": description, "request_id": g.get("request_id"),
                        **extra})
    response.status_code = status
    response.headers.update(NO_STORE)
    return response


def too_many_attempts(seconds):
    """429 while sign-ins are throttled, in the RFC's shape (with a string `error`), and Retry-After."""
    response = token_error(429, "too_many_attempts", f"too many failed sign-ins; try again in {seconds} seconds",
                           retry_after=seconds)
    response.headers["Retry-After"] = str(seconds)
    return response


@bp.post("/auth/login")
def login():
    form = request.form
    repeated = sorted(name for name in form if len(form.getlist(name)) > 1)
    if repeated:  # RFC 6749 §3.2: parameters MUST NOT be included more than once
        return token_error(400, "invalid_request", f"parameter repeated: {repeated[0]}")
    if form.get("grant_type") not in (None, "", "password"):
        return token_error(400, "unsupported_grant_type", "only grant_type=password is supported")
    for field in ("username", "password"):
        if not form.get(field):
            return token_error(400, "invalid_request", f"{field} is required (form field)")
    try:
        attempt = throttle.sign_in(form["username"])  # before the hash
        with attempt:  # a 503 (password pool full) gives the hit back
            user = authenticate(form["username"], form["password"])
    except throttle.Throttled as exc:
        return too_many_attempts(exc.retry_after)
    except Busy as exc:  # RFC 6749's temporarily_unavailable, as 503 with Retry-After
        response = token_error(503, "temporarily_unavailable", exc.description)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if user is not None:
        attempt.succeeded()  # counted by outcome: a right password gives its hits back
        throttle.remember_device(user.username)
    if user is None:
        # Same answer whether the user is missing, inactive or the password is wrong.
        return token_error(400, "invalid_grant", "incorrect username or password")
    token, lifetime = tokens.issue(user)
    return jsonify({"access_token": token, "token_type": "bearer", "expires_in": lifetime}), 200, NO_STORE


@bp.post("/auth/revoke")
@token_required
def revoke():
    """Sign out everywhere: this token, every other token and every browser session of the caller."""
    revoke_all(g.api_user)
    return "", 204


@bp.post("/auth/logout-all")
@token_required
def logout_all():
    """Sign out everywhere: every bearer token and browser session of the caller."""
    revoke_all(g.api_user)
    return "", 204
