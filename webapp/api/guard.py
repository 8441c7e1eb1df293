"""Bearer-token guard and body parsing for API views."""
import re
from functools import wraps

from flask import after_this_request, g, request

from ..auth import api_keys, tokens
from ..errors import ServiceError
from ..limits import IDEMPOTENCY_KEY_MAX
from .errors import error_response


def token_required(view):
    """The view runs for a caller whose bearer credential passed (g.api_user); else a 401."""
    return _bearer_guard(view, bearer_user, _run)


def token_checked_by_the_start(view):
    """token_required for a view that starts a turn (POST /chat/): a JWT's signature and expiry are
    checked here, and its row (the account active, the token's version, not revoked) by the statements
    that start the turn where they can (service.token_check: no round trip of its own), else just
    before the start. The view gets the caller as `credential()`. Whatever else the view answers (a
    4xx for its body included) is answered only once the row passed: a refused token is always a 401."""
    return _bearer_guard(view, unchecked_bearer, _run_then_check)


def _bearer_guard(view, identify, run):
    @wraps(view)
    def wrapped(*args, **kwargs):
        token = _bearer_token()
        if token is None:
            return _unauthorized("missing bearer token", None)
        try:
            identify(token)
        except (tokens.TokenError, api_keys.InvalidKey) as exc:
            return _unauthorized(str(exc))
        return run(view, args, kwargs)
    return wrapped


def _bearer_token():
    """The credential of `Authorization: Bearer <credential>`, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _run(view, args, kwargs):
    return view(*args, **kwargs)


def unchecked_bearer(token):
    """An API key is checked at once (bearer_user); a JWT's row is left for later (tokens.Unchecked):
    the view gets the caller as `credential()` and runs inside `checked_after`. Raises TokenError /
    InvalidKey. (/v1's chat completions call this too.)"""
    if api_keys.looks_like_key(token):
        bearer_user(token)
    else:
        g.unchecked_token = tokens.Unchecked(tokens.claims_of(token), on_accept=_remember_jwt_user)


def _run_then_check(view, args, kwargs):
    try:
        return checked_after(lambda: view(*args, **kwargs))
    except tokens.TokenError as exc:
        return _unauthorized(str(exc))


def checked_after(call):
    """call()'s result, with an unchecked JWT's row checked once call() returns or raises, unless the
    start it made checked it: TokenError when the row refuses, whatever else call() raised."""
    try:
        result = call()
    except tokens.TokenError:  # the row refused, as the start read it
        raise
    except Exception:  # e.g. a 422 for the body: a refused token is a 401 whatever else is wrong
        _check_if_unchecked()
        raise
    _check_if_unchecked()
    return result


def credential():
    """The caller of a token_checked_by_the_start view: the User, or the tokens.Unchecked JWT."""
    return g.get("api_user") or g.unchecked_token


def _check_if_unchecked():
    unchecked = g.get("unchecked_token")
    if unchecked is not None and unchecked.user is None:
        unchecked.check_now()


def bearer_user(token):
    """Sets g.api_user from a bearer credential: a personal API key (told by its `llmk_` prefix) or a
    JWT. Raises TokenError / InvalidKey. (/v1 calls this too, and answers refusals in OpenAI's shape.)"""
    if api_keys.looks_like_key(token):
        _remember(api_keys.verify(token), is_key=True)
    else:
        _remember(tokens.verify(token), is_key=False)
    return g.api_user


def _remember_jwt_user(user):
    _remember(user, is_key=False)


def _remember(user, is_key):
    g.api_user = user
    g.user_name = user.username
    # What an open stream re-checks (webapp/stream_auth.py), read now while the row is fresh: a token's
    # version and jti (sign-out everywhere, or this token revoked; the verifier sets g.auth_jti), or a
    # key's row (g.auth_key_id). A key outlives sign-out everywhere (DESIGN), so its streams end when
    # it is revoked or expires, or with the account.
    g.auth_user_id = user.id
    g.auth_token_version = None if is_key else user.token_version


def _unauthorized(message, error="invalid_token"):
    """RFC 6750 §3: no credentials get a bare challenge; a bad or expired token says invalid_token."""
    challenge = 'Bearer realm="api"' + (f', error="{error}", error_description="{message}"' if error else "")
    return error_response(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


IDEMPOTENCY_HEADER = "Idempotency-Key"
# An RFC 8941 sf-string, as draft-ietf-httpapi-idempotency-key-header writes the key: "…" with \" and \\.
SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])+)"')
SF_ESCAPE = re.compile(r'\\(["\\])')


def idempotency_key():
    """The request's Idempotency-Key (None without one), or a 400 (`invalid_idempotency_key`). Both
    spellings in use are taken: the draft's quoted sf-string (`"8e03…"`) and Stripe's bare value, and
    they name the same key. 1 to 255 printable ASCII characters. (A header sent twice reaches the app
    joined with a comma, as HTTP combines fields: one other key, not a refusal.)"""
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None:
        return None
    raw = raw.strip(" \t")
    quoted = SF_STRING.fullmatch(raw)
    key = SF_ESCAPE.sub(r"\1", quoted.group(1)) if quoted else raw
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not all(" " <= char <= "~" for char in key):
        raise ServiceError(400, "invalid_idempotency_key", f"the Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} "
                           "printable ASCII characters (a UUID is a good one)", IDEMPOTENCY_HEADER)
    return key


def mark_replayed():
    """`Idempotent-Replayed: true` (Stripe's header) on whatever this request answers, errors included:
    the answer is the first request's, not a new one."""
    @after_this_request
    def header(response):
        response.headers["Idempotent-Replayed"] = "true"
        return response


# A UTF-16 surrogate that is not half of a pair: JSON's "\ud800" decodes to one, and no UTF-8 text
# (PostgreSQL's, a file's, a page's) can hold it. Raw UTF-8 bytes cannot carry one, only \u escapes.
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def json_body(optional=False):
    """The request's JSON object ({} for an empty optional body), or a ServiceError saying what is wrong:
    400 for what is not JSON (nested too deep included), 422 for a string no UTF-8 text can hold."""
    if optional and not request.content_length:
        return {}
    if not request.is_json:
        raise ServiceError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # e.g. 100,000 '[': Python's parser gives up past ~1,000 levels
        raise ServiceError(400, "malformed_json", "the request body is nested too deeply") from None
    if data is None:
        raise ServiceError(400, "malformed_json", "the request body is not valid JSON")
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_body", "the JSON body must be an object")
    if SURROGATE_ESCAPE.search(request.get_data(cache=True)):
        field = _lone_surrogate(data)
        if field is not None:
            raise ServiceError(422, "invalid_field", f"{field} holds a lone UTF-16 surrogate (not text)", field)
    return data


def _lone_surrogate(data):
    """The path ('prompt', 'options.x', 'messages[0]') of the first string holding a lone surrogate."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and SURROGATE.search(value):
            return path or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                name = SURROGATE.sub("\ufffd", key)
                name = f"{path}.{name}" if path else name
                if SURROGATE.search(key):
                    return name
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None
