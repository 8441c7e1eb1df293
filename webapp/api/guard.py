"""Bearer-token guard and body parsing for API views."""
from functools import wraps

from flask import g, request

from ..auth import api_keys, tokens
from ..errors import ServiceError
from .errors import error_response


def token_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("missing bearer token", None)
        try:
            bearer_user(token.strip())
        except (tokens.TokenError, api_keys.InvalidKey) as exc:
            return _unauthorized(str(exc))
        return view(*args, **kwargs)
    return wrapped


def bearer_user(token):
    """Sets g.api_user from a bearer credential: a personal API key (told by its `llmk_` prefix) or a
    JWT. Raises TokenError / InvalidKey. (/v1 calls this too, and answers refusals in OpenAI's shape.)"""
    g.api_user = api_keys.verify(token) if api_keys.looks_like_key(token) else tokens.verify(token)
    g.user_name = g.api_user.username
    return g.api_user


def _unauthorized(message, error="invalid_token"):
    """RFC 6750 §3: no credentials get a bare challenge; a bad or expired token says invalid_token."""
    challenge = 'Bearer realm="api"' + (f', error="{error}", error_description="{message}"' if error else "")
    return error_response(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def json_body(optional=False):
    """The request's JSON object ({} for an empty optional body), or a ServiceError saying what is wrong."""
    if optional and not request.content_length:
        return {}
    if not request.is_json:
        raise ServiceError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    data = request.get_json(silent=True)
    if data is None:
        raise ServiceError(400, "malformed_json", "the request body is not valid JSON")
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_body", "the JSON body must be an object")
    return data
