"""GET /models (from the LLM server, cached briefly), GET /health (liveness) and GET /ready."""
from flask import current_app, jsonify

from ..errors import LLMError
from ..extensions import llm_service
from ..readiness import database_state
from . import bp
from .guard import token_required


@bp.get("/models")
@token_required
def models():
    return jsonify({"models": llm_service.list_models(), "default": current_app.config["DEFAULT_MODEL"]})


@bp.get("/health")
def health():
    """Liveness only: the process answers. Never calls the LLM or the database."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready():
    """200 when the database answers and its schema is at head, else 503 (load balancers and compose
    healthchecks use this). The LLM's reachability is reported (cached briefly), never decisive."""
    is_ready, database = database_state()
    body = {"status": "ready" if is_ready else "unready", "database": database, "llm": llm_state()}
    response = jsonify(body)
    response.status_code = 200 if is_ready else 503
    if not is_ready:
        response.headers["Retry-After"] = "5"
    return response


def llm_state():
    try:
        return {"reachable": True, **llm_service.health()}
    except LLMError as exc:
        return {"reachable": False, "error": exc.message}
