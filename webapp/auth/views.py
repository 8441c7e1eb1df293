"""Sign in, sign out, registration and password change for the browser door."""
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, logout_user

from ..errors import ServiceError
from ..limits import API_KEY_NAME_MAX
from ..models import utcnow
from . import api_keys, sessions, setup, throttle
from .accounts import (
    AccountError,
    authenticate,
    check_current_password,
    check_username,
    create_user,
    revoke_all,
    set_password,
)
from .throttle import wait_in_words

bp = Blueprint("auth", __name__)


def safe_next(target):
    """Only a local path: no scheme, no host, no protocol-relative '//' or backslash tricks, and no
    whitespace or control characters (browsers drop tabs and newlines, so '/<TAB>/evil' becomes '//evil')."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    next_url = safe_next(request.values.get("next"))
    if current_user.is_authenticated:
        return redirect(next_url or url_for("web.index"))
    error = None
    if request.method == "POST":
        username = request.form.get("username", "")
        attempt = throttle.sign_in(username)  # before the hash; raises Throttled (429)
        with attempt:  # a 503 (password pool full) gives the hit back
            user = authenticate(username, request.form.get("password", ""))
        if user is not None:
            attempt.succeeded()
            throttle.remember_device(user.username)
            sessions.start(user, remember=bool(request.form.get("remember")))
            return redirect(next_url or url_for("web.index"))
        error = "Incorrect username or password."
    return _login_page(error, next_url), (401 if error else 200)


def _login_page(error, next_url):
    return render_template("login.html", error=error, next=next_url,
                           username=request.form.get("username", ""),
                           allow_signup=current_app.config["ALLOW_SIGNUP"])


def throttled_page(seconds):
    """The same page again, saying why it refuses and for how long; what was typed is kept."""
    wait = wait_in_words(seconds)
    if request.endpoint == "auth.register":
        page = _register_page(f"Too many sign-up attempts from your network. Please wait {wait} and try again.")
    elif request.endpoint == "auth.settings":
        page = _settings_page(f"Too many wrong passwords. Please wait {wait} and try again.")
    else:
        page = _login_page(f"Too many failed sign-in attempts. Please wait {wait} and try again.",
                           safe_next(request.values.get("next")))
    return page, 429, {"Retry-After": str(seconds)}


@bp.post("/logout")
def logout():
    """Sign out: the session ends on the server too, so a copy of the cookie is worth nothing."""
    if current_user.is_authenticated:
        sessions.end_current()
    logout_user()
    flash("You are signed out.")
    return redirect(url_for("auth.login"))


@bp.post("/logout-all")
@login_required
def logout_all():
    """Sign out everywhere: every browser session and every bearer token of this account."""
    revoke_all(current_user._get_current_object())
    logout_user()
    flash("You are signed out everywhere.")
    return redirect(url_for("auth.login"))


@bp.post("/settings/sessions/<int:session_id>/revoke")
@login_required
def revoke_session(session_id):
    if not sessions.revoke(session_id, user_id=current_user.id):
        abort(404)
    if session_id == sessions.current_id():
        logout_user()
        return redirect(url_for("auth.login"))
    flash("That session is signed out.")
    return redirect(url_for("auth.settings"))


def _register_page(error=None):
    admin_needed = setup.admin_needed()
    return render_template("register.html", error=error, username=request.form.get("username", ""),
                           admin_needed=admin_needed)


@bp.route("/register", methods=["GET", "POST"])
def register():
    if not current_app.config["ALLOW_SIGNUP"]:
        # 404 like any missing page, but in words: the operator turned sign-up off.
        return render_template("error.html", code=404, title="Sign-up is closed",
                               message="New accounts can't be created here. Ask the administrator for one."), 404
    if current_user.is_authenticated:
        return redirect(url_for("web.index"))
    error = None
    if request.method == "POST":
        password = request.form.get("password", "")
        if password != request.form.get("confirm", ""):
            error = "The two passwords do not match."
        else:
            try:
                check_username(request.form.get("username", ""))
                with throttle.sign_up():  # every well-formed attempt counts: made, or the name was taken
                    user = create_user(request.form.get("username", ""), password,
                                       setup_token=request.form.get("setup_token", "").strip() or None)
            except AccountError as exc:
                error = str(exc).capitalize() + "."
            else:
                throttle.remember_device(user.username)
                sessions.start(user)
                return redirect(url_for("web.index"))
    return _register_page(error), (422 if error else 200)


def _settings_page(error=None, done=False, key_error=None, new_key=None):
    user = current_user._get_current_object()
    return render_template("settings.html", error=error, done=done, sessions=sessions.active(user.id),
                           current_session=sessions.current_id(), device_name=sessions.device_name,
                           keys=api_keys.listed(user.id), key_error=key_error, new_key=new_key,
                           now=utcnow(), key_name_max=API_KEY_NAME_MAX)


@bp.post("/settings/keys")
@login_required
def create_key():
    """Make a personal API key: the page shows it this once (never stored, never shown again)."""
    try:
        row, key = api_keys.create(current_user._get_current_object(), request.form.get("name", ""),
                                   request.form.get("expires_in_days") or None)
    except ServiceError as exc:
        return _settings_page(key_error=exc.message.capitalize() + "."), 422
    return _settings_page(new_key={"name": row.name, "key": key}), 200, {"Cache-Control": "no-store"}


@bp.post("/settings/keys/<int:key_id>/revoke")
@login_required
def revoke_key(key_id):
    try:
        api_keys.revoke(current_user.id, key_id)
    except ServiceError:
        abort(404)
    flash("That API key is revoked.")
    return redirect(url_for("auth.settings"))


@bp.route("/settings", methods=["GET", "POST"])
@login_required
def settings():
    error, done = None, False
    if request.method == "POST":
        user = current_user._get_current_object()
        new = request.form.get("new_password", "")
        current_session = sessions.current_id()
        if new != request.form.get("confirm", ""):
            error = "The two new passwords do not match."
        else:
            attempt = throttle.password_check(user.id)  # before the hash; raises Throttled (429)
            with attempt:
                checked = check_current_password(user, request.form.get("current_password", ""))
            if checked is None:
                error = "Your current password is not right."
            else:
                attempt.succeeded()
                try:
                    # Ends every other session and every API token; this browser stays signed in.
                    set_password(checked, new, keep_session=current_session)
                except AccountError as exc:
                    error = str(exc).capitalize() + "."
                else:
                    done = True
    return _settings_page(error, done), (422 if error else 200)
