"""Sign in, sign out, registration and password change for the browser door."""
from flask import Blueprint

bp = Blueprint("auth", __name__)


@bp.route("/login", methods=["GET", "POST"])
def login():
    return "sign in page (to do)"
