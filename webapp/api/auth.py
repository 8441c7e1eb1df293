"""POST /auth/login: the OAuth2 password grant, as a form, answering a bearer token."""
from flask import g, jsonify, request

from ..auth import throttle, tokens
from ..auth.accounts import authenticate, revoke_all
from . import bp
from .errors import error_response
from .guard import token_required


@bp.post("/auth/login")
def login():
    form = request.form
    if form.get("grant_type") not in (None, "", "password"):
        return error_response(400, "unsupported_grant_type", "only grant_type=password is supported",
                              "grant_type")
    for field in ("username", "password"):
        if not form.get(field):
            return error_response(422, "invalid_field", f"{field} is required (form field)", field)
    attempt = throttle.sign_in(form["username"])  # before the hash; raises Throttled (429)
    with attempt:  # a 503 (password pool full) gives the hit back
        user = authenticate(form["username"], form["password"])
    if user is not None:
        attempt.succeeded()  # counted by outcome: a right password gives its hits back
        throttle.remember_device(user.username)
    if user is None:
        # Same answer whether the user is missing, inactive or the password is wrong.
        return error_response(401, "invalid_credentials", "incorrect username or password",
                              headers={"WWW-Authenticate": "Bearer"})
    token, lifetime = tokens.issue(user)
    return jsonify({"access_token": token, "token_type": "bearer", "expires_in": lifetime})


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
