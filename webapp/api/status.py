"""GET /models (from the LLM server, cached briefly) and GET /health."""
from flask import current_app, jsonify

from ..errors import LLMError
from ..extensions import llm_service
from . import bp
from .guard import token_required


@bp.get("/models")
@token_required
def models():
    return jsonify({"models": llm_service.list_models(), "default": current_app.config["DEFAULT_MODEL"]})


@bp.get("/health")
def health():
    """Liveness of the app plus reachability of the LLM server (the app itself is up if this answers)."""
    try:
        info = llm_service.health()
        return jsonify({"status": "ok", "llm": {"reachable": True, **info}})
    except LLMError as exc:
        # Still 200: the app is alive; load balancers should not pull it for the LLM's sake.
        return jsonify({"status": "degraded", "llm": {"reachable": False, "error": exc.message}})
