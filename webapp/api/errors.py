"""JSON error answers for the API blueprint."""
from flask import g, jsonify, request
from werkzeug.exceptions import HTTPException

from .. import llm
from ..chat import ChatError
from . import bp


def error_response(status, code, message, field=None, headers=None, **extra):
    body = {"code": code, "message": message, "request_id": g.get("request_id")}
    if field:
        body["field"] = field
    body.update(extra)
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.app_errorhandler(ChatError)
def chat_error(exc):
    return error_response(exc.status, exc.code, exc.message, exc.field)


@bp.app_errorhandler(llm.LLMError)
def llm_error(exc):
    return error_response(exc.status, exc.code, exc.message)


def is_api_request():
    """Requests to the API's paths get JSON errors even when no API view ran (404, 405)."""
    return request.blueprint == "api" or request.path.startswith(API_PREFIXES)


API_PREFIXES = ("/auth/", "/chat/", "/conversations", "/models", "/health", "/openapi.json")


def too_many_sign_ins(seconds):
    return error_response(429, "too_many_attempts",
                          f"too many failed sign-ins; try again in {seconds} seconds",
                          headers={"Retry-After": str(seconds)}, retry_after=seconds)


def http_error_as_json(exc: HTTPException):
    return error_response(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"),
                          exc.description or exc.name)
