"""The JSON API: bearer-token auth, chat, conversations, models, health. Errors are always JSON:
{"error": {"code", "message", "request_id"}} with the right status."""
from flask import Blueprint

bp = Blueprint("api", __name__)

from . import errors, auth, chat, conversations, models, openapi  # noqa: E402,F401  (routes register on import)
