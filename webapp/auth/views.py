"""Sign in, sign out, registration and password change for the browser door."""
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from .passwords import AccountError, authenticate, create_user, set_password
from .throttle import sign_in_limits, sign_up_limit, wait_in_words

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
@sign_in_limits
def login():
    next_url = safe_next(request.values.get("next"))
    if current_user.is_authenticated:
        return redirect(next_url or url_for("web.index"))
    error = None
    if request.method == "POST":
        user = authenticate(request.form.get("username", ""), request.form.get("password", ""))
        if user is not None:
            login_user(user, remember=bool(request.form.get("remember")))
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
        page = render_template("register.html", username=request.form.get("username", ""),
                               error=f"Too many new accounts from your network. Please wait {wait} and try again.")
    else:
        page = _login_page(f"Too many failed sign-in attempts. Please wait {wait} and try again.",
                           safe_next(request.values.get("next")))
    return page, 429, {"Retry-After": str(seconds)}


@bp.post("/logout")
def logout():
    logout_user()
    flash("You are signed out.")
    return redirect(url_for("auth.login"))


@bp.route("/register", methods=["GET", "POST"])
@sign_up_limit
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
                user = create_user(request.form.get("username", ""), password)
            except AccountError as exc:
                error = str(exc).capitalize() + "."
            else:
                login_user(user)
                return redirect(url_for("web.index"))
    return render_template("register.html", error=error,
                           username=request.form.get("username", "")), (422 if error else 200)


@bp.route("/settings", methods=["GET", "POST"])
@login_required
def settings():
    error, done = None, False
    if request.method == "POST":
        user = current_user._get_current_object()
        new = request.form.get("new_password", "")
        if not user.check_password(request.form.get("current_password", "")):
            error = "Your current password is not right."
        elif new != request.form.get("confirm", ""):
            error = "The two new passwords do not match."
        else:
            try:
                set_password(user, new)  # ends every other session and API token
            except AccountError as exc:
                error = str(exc).capitalize() + "."
            else:
                login_user(user)  # this browser stays signed in with the new session id
                done = True
    return render_template("settings.html", error=error, done=done), (422 if error else 200)
