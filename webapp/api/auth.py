"""POST /auth/login: the token endpoint of the OAuth2 password grant (RFC 6749 §4.3), as a form.

Success and failure follow RFC 6749 §5 so that OAuth2 libraries understand them: the token answer is
never cached (`Cache-Control: no-store`, `Pragma: no-cache`), and every refusal is
`{"error": <RFC code>, "error_description", "request_id"}` — 400 `invalid_request` for a missing or
repeated parameter, 400 `invalid_grant` for a wrong username or password, 400
`unsupported_grant_type` for any grant but `password` (which may be omitted, as the seed's FastAPI
form allowed), 429 `too_many_attempts` with `Retry-After` while sign-ins are throttled, and 503
`temporarily_unavailable` with `Retry-After` while too many sign-ins wait for the password pool.

POST /auth/revoke: token revocation (RFC 7009) — one access token or API key, given as `token=`.
POST /auth/logout-all: sign out everywhere (every token and browser session of the caller).
"""
from flask import g, jsonify, request

from ..auth import api_keys, throttle, tokens
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


def too_many_attempts(seconds, what="failed sign-ins"):
    """429 while sign-ins are throttled, in the RFC's shape (with a string `error`), and Retry-After."""
    response = token_error(429, "too_many_attempts", f"too many {what}; try again in {seconds} seconds",
                           retry_after=seconds)
    response.headers["Retry-After"] = str(seconds)
    return response


def unavailable(exc):
    """RFC 6749's temporarily_unavailable, as 503 with Retry-After (the limit store or password pool is full)."""
    response = token_error(503, "temporarily_unavailable", exc.description)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def repeated_parameter(form):
    """RFC 6749 §3.2 (and RFC 7009 §2.1, which builds on it): no parameter may be sent twice."""
    repeated = sorted(name for name in form if len(form.getlist(name)) > 1)
    if repeated:
        return token_error(400, "invalid_request", f"parameter repeated: {repeated[0]}")
    return None


@bp.post("/auth/login")
def login():
    form = request.form
    if (refused := repeated_parameter(form)) is not None:
        return refused
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
    except Busy as exc:
        return unavailable(exc)
    if user is not None:
        attempt.succeeded()  # counted by outcome: a right password gives its hits back
        throttle.remember_device(user.username)
    if user is None:
        # Same answer whether the user is missing, inactive or the password is wrong.
        return token_error(400, "invalid_grant", "incorrect username or password")
    token, lifetime = tokens.issue(user)
    return jsonify({"access_token": token, "token_type": "bearer", "expires_in": lifetime}), 200, NO_STORE


FORM = "application/x-www-form-urlencoded"
TOKEN_MAX = 4096  # longer than any token or key we issue: nothing to look up


@bp.post("/auth/revoke")
def revoke():
    """RFC 7009: revoke the one access token (JWT) or personal API key sent as `token`.

    No client authentication: our clients are public (the password grant, no client secret), so
    holding the token is the proof (RFC 7009 §5: whoever can revoke it could use it). The answer is
    200 whether the token was live, already revoked, expired, unknown or not ours (§2.2), so it is no
    oracle; `token_type_hint` is ignored (§2.1 allows it: the token's form says what it is). Errors
    are RFC 6749 §5.2's, as on the token endpoint: a malformed request (no token, a parameter twice, a
    body that is not a form, the token in the URL) is 400 invalid_request — not 415, which OAuth
    clients do not read as an error response. Every well-formed request takes a hit from
    REVOKE_LIMIT_PER_ADDRESS before anything is looked up, so the answer to a throttled client says
    nothing about the token either."""
    form = request.form
    if (refused := repeated_parameter(form)) is not None:
        return refused
    if "token" in request.args:  # a URL ends up in logs and histories
        return token_error(400, "invalid_request", "send token in the request body (a form), not in the URL")
    if request.content_length and request.mimetype != FORM:
        return token_error(400, "invalid_request", f"send the token as a form: Content-Type: {FORM}")
    token = form.get("token", "")
    if not token:
        return token_error(400, "invalid_request",
                           "token is required (form field): the access token or API key to revoke. "
                           "To sign out everywhere, POST /auth/logout-all with your bearer token.")
    try:
        throttle.revocation()
    except throttle.Throttled as exc:
        return too_many_attempts(exc.retry_after, "revocation requests")
    except Busy as exc:
        return unavailable(exc)
    if len(token) <= TOKEN_MAX:
        if api_keys.looks_like_key(token):
            api_keys.revoke_by_value(token)
        else:
            tokens.revoke(token)
    return jsonify({}), 200, NO_STORE


@bp.post("/auth/logout-all")
@token_required
def logout_all():
    """Sign out everywhere: every bearer token and browser session of the caller."""
    revoke_all(g.api_user)
    return "", 204
