"""The browser door: server-rendered pages and htmx fragments, signed in with a session cookie."""
from flask import Blueprint, flash, url_for

from ..auth import sessions
from ..extensions import login_manager
from .htmx import go_to

bp = Blueprint("web", __name__)

# No inline scripts anywhere: every script is a file under /static.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")


@login_manager.user_loader
def load_user(session_id):
    """The cookie holds a server-side session's random token; ended sessions load nobody."""
    return sessions.load(session_id)


@login_manager.unauthorized_handler
def send_to_sign_in():
    """Signed-out visitors go to the sign-in page and come back; htmx requests get a full-page
    redirect instead of a sign-in form swapped into some corner of the page."""
    from htmx_flask import request
    target = url_for("auth.login", next=request.full_path.rstrip("?"))
    if not request.htmx:
        flash("Please sign in to continue.")
    return go_to(target)


def init_web(app):
    from ..auth import views as auth_views  # noqa: F401
    from . import views  # noqa: F401  (routes register on import)
    app.register_blueprint(bp)
    app.register_blueprint(auth_views.bp)
    login_manager.login_view = "auth.login"
    sessions.init_sessions(app)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if response.status_code == 204:  # no body (Werkzeug sends none), so no type either
            response.headers.pop("Content-Type", None)
        return response
