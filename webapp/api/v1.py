"""/v1: the OpenAI-compatible door (`GET /v1/models`, `POST /v1/chat/completions`), for any OpenAI
client (the official SDKs, LangChain, curl) with a personal API key or a bearer token.

It follows OpenAI's semantics where they differ from the app's own API (DESIGN.md):
- errors are `{"error": {"message", "type", "code", "param"}}` with OpenAI's statuses (401
  invalid_api_key, 404 model_not_found, 400 invalid_request_error, 429 rate_limit_exceeded);
- the model receives exactly the client's messages (no system prompt or history of ours is added);
- a client that goes away cancels the call: the answer is saved as `cancelled` with its partial text
  (the app's own /chat/ and the pages keep generating for a client that left) -- unless the call
  has an `Idempotency-Key`: that client has said it will retry, so the answer goes on and the retry
  gets it whole;
- every request field is mapped, ignored for a stated reason, or refused with a 400 (REQUEST_FIELDS
  below; the README's table says the same), never silently dropped.
Every call runs through the chat service and is saved in a conversation marked as made through the
API; `X-Conversation-Id` (or `metadata.conversation_id`) continues one, and each answer names its
conversation in the `X-Conversation-Id` response header.
"""
import json
import logging
import select
import socket
import time

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from werkzeug.exceptions import HTTPException

from .. import service, stream_auth
from ..auth import api_keys, tokens
from ..errors import ANSWER_ERROR_STATUS, LLMError, ServiceError, with_http_headers
from ..extensions import db, llm_service
from .guard import bearer_user, checked_after, credential, idempotency_key, json_body, mark_replayed, unchecked_bearer

bp = Blueprint("v1", __name__, url_prefix="/v1")

MAX_MESSAGES = 1000
STOP_MAX = 4  # stop sequences, as OpenAI allows
PENALTY = (-2.0, 2.0)

# Every chat.completions request field: how it is handled. ("mapped", Ollama option or meaning),
# ("ignored", reason) or ("refused", when). Unknown fields are refused, as OpenAI refuses them.
REQUEST_FIELDS = {
    "model": ("mapped", "the model (404 model_not_found when the model server does not have it)"),
    "messages": ("mapped", "sent to the model exactly as given; stored in the conversation"),
    "stream": ("mapped", "`data: {chunk}` Server-Sent Events ending with `data: [DONE]`"),
    "stream_options": ("mapped", "`include_usage`: a last chunk with `usage` and no choices"),
    "temperature": ("mapped", "Ollama `temperature`"),
    "top_p": ("mapped", "Ollama `top_p`"),
    "seed": ("mapped", "Ollama `seed`"),
    "max_tokens": ("mapped", "Ollama `num_predict`"),
    "max_completion_tokens": ("mapped", "Ollama `num_predict` (wins over max_tokens)"),
    "stop": ("mapped", "Ollama `stop` (a string or up to 4)"),
    "frequency_penalty": ("mapped", "Ollama `frequency_penalty`"),
    "presence_penalty": ("mapped", "Ollama `presence_penalty`"),
    "n": ("mapped", "1 only; n > 1 is refused"),
    "metadata": ("mapped", "`conversation_id` continues that conversation; other keys are ignored"),
    "user": ("ignored", "the caller is known from the key or token; no end-user ids are kept"),
    "safety_identifier": ("ignored", "as `user`"),
    "prompt_cache_key": ("ignored", "the model server caches prompts by itself"),
    "store": ("ignored", "every call is stored in your conversations, whatever this says"),
    "service_tier": ("ignored", "there is one tier"),
    "reasoning_effort": ("ignored", "the model decides; no reasoning settings are passed"),
    "verbosity": ("ignored", "the model decides"),
    "tools": ("refused", "tool calling is not supported"),
    "tool_choice": ("refused", "tool calling is not supported"),
    "parallel_tool_calls": ("refused", "tool calling is not supported"),
    "functions": ("refused", "function calling is not supported"),
    "function_call": ("refused", "function calling is not supported"),
    "logprobs": ("refused", "true: log probabilities are not available (false is accepted)"),
    "top_logprobs": ("refused", "log probabilities are not available"),
    "logit_bias": ("refused", "not supported (an empty object is accepted)"),
    "response_format": ("refused", "json_object and json_schema are not supported ({\"type\": \"text\"} is)"),
    "audio": ("refused", "audio output is not supported"),
    "modalities": ("refused", "only [\"text\"] is supported"),
    "prediction": ("refused", "predicted outputs are not supported"),
    "web_search_options": ("refused", "web search is not supported"),
}
ROLES = {"system", "developer", "user", "assistant"}


class OpenAIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", code=None, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def error_body(message, type_, code=None, param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc):
    response = jsonify(error_body(exc.message, exc.type, exc.code, exc.param))
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


def invalid(param, message, code="invalid_value"):
    return OpenAIError(400, message, code=code, param=param)


# ---- errors: this blueprint's own renderer, in OpenAI's shape ---------------------------------------

@bp.errorhandler(OpenAIError)
def openai_error(exc):
    return error_response(exc)


@bp.errorhandler(ServiceError)
def service_error(exc):
    return error_response(from_service_error(exc))


def from_service_error(exc):
    if exc.code == "idempotency_key_reused":  # the draft's 422 (the SDKs raise UnprocessableEntityError)
        return OpenAIError(422, exc.message, "invalid_request_error", exc.code)
    if exc.status == 429:
        return OpenAIError(429, exc.message, "requests", "rate_limit_exceeded", headers=getattr(exc, "headers", None))
    if exc.status in (400, 415, 422):  # OpenAI answers every malformed request with 400
        return OpenAIError(400, exc.message, "invalid_request_error", exc.code, exc.field)
    if exc.status >= 500:
        return OpenAIError(exc.status, exc.message, "server_error", exc.code)
    return OpenAIError(exc.status, exc.message, "invalid_request_error", exc.code, exc.field)


@bp.errorhandler(LLMError)
def llm_error(exc):
    if exc.code == "model_not_found":
        return error_response(OpenAIError(404, exc.message, code="model_not_found", param="model"))
    return error_response(OpenAIError(exc.status, exc.message, "server_error", exc.code))


@bp.errorhandler(HTTPException)
def http_error(exc):
    return http_error_response(exc)


def http_error_response(exc):
    """404/405/413… in OpenAI's shape (also for /v1 URLs that match no route: see create_app)."""
    status = exc.code or 500
    type_ = "invalid_request_error" if status < 500 else "server_error"
    code = "unknown_url" if status == 404 else (exc.name or "error").lower().replace(" ", "_")
    return with_http_headers(error_response(OpenAIError(status, exc.description or exc.name, type_, code)), exc)


@bp.errorhandler(Exception)
def unexpected(exc):
    logging.getLogger("webapp").exception("unhandled error on %s %s", request.method, request.path)
    db.session.rollback()
    return internal_error()


def internal_error():
    return error_response(OpenAIError(500, "something went wrong on our side", "server_error", "internal_error"))


# ---- auth: personal API keys and bearer tokens ------------------------------------------------------

@bp.before_request
def authenticate():
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise OpenAIError(401, "You didn't provide an API key. Send it as `Authorization: Bearer llmk_...` "
                               "(make one on the settings page).", code="invalid_api_key")
    try:
        if request.endpoint == "v1.chat_completions":  # a JWT's row is checked by the statement that starts the turn
            unchecked_bearer(token.strip())
        else:
            bearer_user(token.strip())
    except (tokens.TokenError, api_keys.InvalidKey) as exc:
        raise refused(exc) from None


def refused(exc):
    return OpenAIError(401, f"Incorrect API key provided: {exc}.", code="invalid_api_key")


# ---- models ------------------------------------------------------------------------------------------

def _models():
    return [m["name"] for m in llm_service.list_models() if m.get("name")]


def _model_object(name):
    return {"id": name, "object": "model", "created": 0, "owned_by": current_app.config["LLM_BACKEND"]}


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": [_model_object(name) for name in _models()]})


@bp.get("/models/<path:model>")
def get_model(model):
    name = _resolve(model, _models())
    if name is None:
        raise OpenAIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
    return jsonify(_model_object(name))


def _resolve(model, names):
    """Ollama adds ':latest' to a name without a tag; so does this check."""
    for candidate in (model, f"{model}:latest"):
        if candidate in names:
            return candidate
    return None


def _check_model(model):
    """The same names as every other door (the server's list plus ALLOWED_MODELS; while the server is
    down, ALLOWED_MODELS and DEFAULT_MODEL), refused the way OpenAI refuses an unknown model."""
    if _resolve(model, service.known_models()) is None:
        raise OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                          code="model_not_found", param="model")


# ---- chat completions --------------------------------------------------------------------------------

def parse_request(data):
    """(model, messages, options, stream, include_usage, conversation_id) from a chat.completions body."""
    for name, value in data.items():
        rule = REQUEST_FIELDS.get(name)
        if rule is None:
            raise invalid(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
        if rule[0] == "refused" and not _harmless(name, value):
            raise invalid(name, f"`{name}` is not supported here: {rule[1]}.", "unsupported_parameter")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model", "you must provide a model parameter", "missing_required_parameter")
    messages = parse_messages(data.get("messages"))
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise invalid("stream", "stream must be a boolean")
    stream_options = data.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(stream_options, dict):
            raise invalid("stream_options", "stream_options must be an object")
    include_usage = bool((stream_options or {}).get("include_usage"))
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise invalid("n", "only n=1 is supported", "unsupported_value")
    return model.strip(), messages, parse_options(data), stream, include_usage, conversation_ref(data)


def _harmless(name, value):
    """Refused fields sent with their 'off' value (SDKs and frameworks send some of these)."""
    if value is None:
        return True
    if name == "logprobs":
        return value is False
    if name in ("logit_bias", "tools", "functions"):
        return value in ({}, [])
    if name == "response_format":
        return value == {"type": "text"}
    if name == "modalities":
        return value == ["text"]
    return False


def parse_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty array")
    if len(messages) > MAX_MESSAGES:
        raise invalid("messages", f"at most {MAX_MESSAGES} messages")
    limit = current_app.config["MAX_PROMPT_CHARS"]
    parsed = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(param, f"{param} must be an object")
        role = message.get("role")
        if role == "tool" or message.get("tool_calls") or message.get("function_call"):
            raise invalid(param, "tool and function messages are not supported", "unsupported_parameter")
        if role not in ROLES:
            raise invalid(f"{param}.role", f"{param}.role must be one of system, developer, user, assistant")
        content = _text(message.get("content"), f"{param}.content")
        if len(content) > limit:
            raise invalid(f"{param}.content", f"{param}.content is longer than {limit} characters",
                          "context_length_exceeded")
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    if parsed[-1]["role"] != "user" or not parsed[-1]["content"].strip():
        raise invalid("messages", "the last message must be the user's, and not empty")
    return parsed


def _text(content, param):
    """A string, or an array of text parts joined (images, audio and files are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(param, "only text content parts are supported", "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(param, f"{param} must be a string or an array of text parts")


def _number(data, name, kind, low, high):
    value = data.get(name)
    if value is None:
        return None
    wrong = isinstance(value, bool) or not isinstance(value, (int, float))
    if wrong or (kind is int and not float(value).is_integer()):
        raise invalid(name, f"{name} must be {'an integer' if kind is int else 'a number'}")
    if not low <= value <= high:
        raise invalid(name, f"{name} must be between {low} and {high}")
    return kind(value)


def parse_options(data):
    """The Ollama options a request asks for (the same ranges as the app's own API)."""
    options, rules = {}, service.option_rules()  # with the operator's ceilings (LLM_MAX_NUM_PREDICT)
    for name, option in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("max_tokens", "num_predict"), ("max_completion_tokens", "num_predict")):
        kind, low, high = rules[option]
        value = _number(data, name, kind, low, high)
        if value is not None:
            options[option] = value
    for name in ("frequency_penalty", "presence_penalty"):
        value = _number(data, name, float, *PENALTY)
        if value is not None:
            options[name] = value
    stop = data.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, list) or not 1 <= len(stop) <= STOP_MAX
                or not all(isinstance(s, str) and s for s in stop)):
            raise invalid("stop", f"stop must be a non-empty string or an array of 1 to {STOP_MAX} of them")
        options["stop"] = stop
    return options


def conversation_ref(data):
    """The conversation to continue: `X-Conversation-Id`, else `metadata.conversation_id`, else None."""
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("metadata", "metadata must be an object")
    raw = request.headers.get("X-Conversation-Id") or (metadata or {}).get("conversation_id")
    if raw in (None, ""):
        return None
    text = str(raw).strip()
    if not text.isascii() or not text.isdigit():
        raise invalid("metadata.conversation_id", "the conversation id must be an integer")
    return int(text)


@bp.post("/chat/completions")
def chat_completions():
    """A JWT's row is checked by the start (service.token_check), or once the call is answered: a
    refused token is a 401 whatever else is wrong with the request (as POST /chat/ answers)."""
    try:
        return checked_after(_chat_completions)
    except tokens.TokenError as exc:
        raise refused(exc) from None


def _chat_completions():
    if not request.is_json:
        raise invalid(None, "send a JSON body with Content-Type: application/json", "invalid_json")
    try:  # the API's parser: it also refuses nesting too deep to parse and lone surrogates
        data = json_body()
    except ServiceError as exc:
        if exc.code == "invalid_field":  # names the field: OpenAI's 400 with `param`
            raise
        raise invalid(None, "We could not parse the JSON body of your request.", "invalid_json") from None
    model, messages, options, stream, include_usage, conversation_id = parse_request(data)
    key = idempotency_key()
    _check_model(model)
    try:
        turn = service.start_exchange(credential(), messages, conversation_id, model, g.request_id, options,
                                      idempotency_key=key)
    except ServiceError as exc:
        if exc.code == "not_found":
            raise OpenAIError(404, "conversation not found", code="conversation_not_found",
                              param="metadata.conversation_id") from None
        raise
    if turn.replayed:
        mark_replayed()
    headers = {"X-Conversation-Id": str(turn.conversation_id)}
    # With an Idempotency-Key the client has said it will retry: hanging up does not cancel the answer.
    gone = ClientWatch(request.environ)
    cancel = key is None
    if stream:
        return Response(stream_with_context(stream_chunks(turn, include_usage, gone, cancel)),
                        mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    final = wait_or_cancel(turn.message_id, gone) if cancel else service.wait_final(turn.message_id)
    if final is None:
        raise OpenAIError(404, "the conversation was deleted during the answer", code="conversation_not_found")
    if final.status == "error" or final.status == "interrupted":
        status = ANSWER_ERROR_STATUS.get(final.error_code, 502)
        raise OpenAIError(status, final.error or "the model failed", "server_error", final.error_code)
    response = jsonify(completion(turn, final))
    response.headers.update(headers)
    return response


def wait_or_cancel(message_id, gone):
    """The final answer; a client that hangs up meanwhile cancels it (OpenAI's semantics). An answer
    generated in this process is waited for in memory, the client checked once a second and the row
    not read while it runs; one generated elsewhere is followed through its row."""
    while True:
        final = service.wait_here(message_id, timeout=1.0)
        if final is None:
            final = service.wait_final(message_id, timeout=1.0)
            if final is None:
                return None  # deleted meanwhile
        if final is not False and not service.is_active(final):
            return final
        if gone():
            service.cancel(message_id)
            return service.wait_final(message_id, timeout=10.0)


def _finish_reason(message):
    return "length" if message.done_reason == "length" else "stop"


def _usage(message):
    prompt, completion_tokens = message.prompt_tokens or 0, message.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def _base(turn, kind):
    return {"id": f"chatcmpl-{turn.message_id}", "object": kind, "created": int(turn.answer.created_at.timestamp()),
            "model": turn.model, "system_fingerprint": None}


def completion(turn, final):
    return {**_base(turn, "chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": final.content, "refusal": None},
                         "logprobs": None, "finish_reason": _finish_reason(final)}],
            "usage": _usage(final)}


def _frame(payload):
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def stream_chunks(turn, include_usage, gone, cancel=True):
    """chat.completion.chunk frames, then `data: [DONE]`. A client that goes away (the server's write
    fails and closes this generator, or the socket is seen closed while the model is quiet) cancels
    the answer: it is saved as cancelled with its partial text (`cancel` False, with an
    Idempotency-Key: it goes on, and a retry replays it from the first chunk). A stream whose key or
    token is revoked (or whose account is signed out everywhere or disabled) ends the same way, after
    an error frame saying so."""
    base = _base(turn, "chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}

    def chunk(delta, finish_reason=None):
        return _frame({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish_reason}], **extra})

    finished = False
    watch = stream_auth.watch()
    try:
        yield chunk({"role": "assistant", "content": ""})
        for kind, value in service.follow(turn.message_id):
            if not watch.still_allowed():  # cancelled even with an Idempotency-Key: no retry may follow
                finished = True
                service.cancel(turn.message_id)
                yield _frame(error_body("Your API key or token is no longer valid: the call was ended.",
                                        "invalid_request_error", "invalid_api_key"))
                return
            if kind == "token":
                yield chunk({"content": value})
            elif kind == "idle" and gone():
                return
            elif kind == "ping":
                yield ": ping\n\n"
            elif kind == "done":
                finished = True
                if value is None:
                    return
                if value.status in ("error", "interrupted"):
                    yield _frame(error_body(value.error or "the model failed", "server_error", value.error_code))
                    return
                yield chunk({}, _finish_reason(value))
                if include_usage:
                    yield _frame({**base, "choices": [], "usage": _usage(value)})
                yield "data: [DONE]\n\n"
                return
        finished = True  # the answer's row is gone (conversation deleted)
    finally:
        if not finished and cancel:
            service.cancel(turn.message_id)


class ClientWatch:
    """Has the client hung up? Under gunicorn the request's socket is at hand: readable with nothing
    to read means the peer closed it. (Elsewhere, e.g. the test client, it never says so.)"""

    def __init__(self, environ):
        self.sock = environ.get("gunicorn.socket")
        self.checked = 0.0

    def __call__(self):
        if self.sock is None or time.monotonic() - self.checked < 0.25:
            return False
        self.checked = time.monotonic()
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
