"""Chat pages (filled in by the browser-UI work)."""
from flask import redirect, url_for
from flask_login import login_required

from . import bp


@bp.get("/")
@login_required
def index():
    return redirect(url_for("api.health"))
