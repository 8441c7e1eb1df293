"""The service's refusals, and which door renders them.

`ServiceError` is what the chat service and the views raise for anything a person or program can get
wrong: a status, a stable `code`, words for people and, when one field is to blame, its name. The
service never renders: each door registers its own renderer on its blueprint (webapp/api/errors.py:
JSON; webapp/web/errors.py: a page or an htmx fragment), so the matched route's blueprint picks the
shape. Only a URL that matches no route (404/405 at routing) is placed by its path (`is_api_path`,
the prefix list passed in by create_app next to the blueprint registrations).

Where a page shows an error (webapp/web/errors.py, ERROR_SLOTS):

| page action                 | where the words appear                   |
| --------------------------- | ---------------------------------------- |
| send, new chat              | above the composer (#composer-error)     |
| rename                      | under the title (#rename-error)          |
| model and system prompt     | in the settings panel (#settings-error)  |
| Stop, Retry / Regenerate    | in that answer's footer (#answer-error-ID) |
"""
from flask import request

from . import llm
from .llm import LLMError  # the model server's refusals: rendered by each door like ServiceError

__all__ = ["ANSWER_ERROR_STATUS", "LLMError", "ServiceError", "not_found", "invalid", "init_app", "is_api_request",
           "with_http_headers"]

# A failed answer's saved error code -> the API's status for it: the model server's own errors keep
# the status their class carries; a worker that died is "unavailable", a bug is a 500.
ANSWER_ERROR_STATUS = {
    **{kind.code: kind.status for kind in (llm.LLMUnreachable, llm.LLMTimeout, llm.ModelNotFound, llm.UpstreamError)},
    "interrupted": 503,
    "queue_timeout": 503,
    "internal_error": 500,
}


class ServiceError(Exception):
    """A refusal: `status`, a stable `code`, words for people, and the `field` to blame if any."""

    def __init__(self, status, code, message, field=None, retry_after=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after = retry_after  # seconds, for a 429: sent as Retry-After

    @property
    def headers(self):
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


def with_http_headers(response, exc):
    """An HTTP error's own headers on whichever door's answer renders it (e.g. Allow on 405, as
    RFC 9110 asks), but never its content type: each door sets its own."""
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def not_found(what, field=None):
    """Someone else's id answers exactly like a missing one."""
    return ServiceError(404, "not_found", f"{what} not found", field)


def invalid(field, message):
    return ServiceError(422, "invalid_field", message, field)


_api_prefixes = ()


def init_app(app, api_prefixes):
    global _api_prefixes
    _api_prefixes = tuple(api_prefixes)


def is_api_request():
    """For errors raised outside any route (no match, 405): does this URL belong to the API door?"""
    if request.url_rule is not None and request.blueprint:
        return request.blueprint == "api"
    return request.path.startswith(_api_prefixes)
