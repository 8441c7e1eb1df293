"""The API door's one error renderer: {"error": {"code", "message", "request_id", "field"?}} with the
right status. Registered on the API blueprint, so every refusal raised in an API view answers JSON.
(The token endpoint and /v1 have standard shapes of their own: RFC 6749 §5.2 and OpenAI's.)"""
from flask import g, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import LLMError, ServiceError, with_http_headers
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


@bp.errorhandler(ServiceError)
def service_error(exc):
    if exc.retry_after is not None:
        return error_response(exc.status, exc.code, exc.message, exc.field,
                              headers={"Retry-After": str(exc.retry_after)}, retry_after=exc.retry_after)
    return error_response(exc.status, exc.code, exc.message, exc.field)


@bp.errorhandler(LLMError)
def llm_error(exc):
    return error_response(exc.status, exc.code, exc.message)


def http_error(exc: HTTPException):
    """404/405/413… as JSON (also for unmatched URLs under an API prefix; see webapp/errors.py)."""
    return with_http_headers(error_response(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"),
                                            exc.description or exc.name), exc)


def internal_error():
    return error_response(500, "internal_error", "something went wrong on our side")


def too_many_sign_ins(seconds):
    return error_response(429, "too_many_attempts",
                          f"too many failed sign-ins; try again in {seconds} seconds",
                          headers={"Retry-After": str(seconds)}, retry_after=seconds)
