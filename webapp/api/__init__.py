"""The JSON API: bearer-token auth, turns, conversations, models, health. Errors are always JSON:
{"error": {"code", "message", "request_id"}} with the right status (see errors.py)."""
from flask import Blueprint

bp = Blueprint("api", __name__)

from . import auth, conversations, errors, keys, openapi, status, turns  # noqa: E402,F401  (routes register on import)
