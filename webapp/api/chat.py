"""POST /chat/: one turn, answered whole as JSON or streamed as Server-Sent Events."""
from flask import g, jsonify

from .. import chat, sse
from ..models import CANCELLED, COMPLETE, usage_dict
from . import bp
from .errors import error_response
from .guard import json_body, token_required

# How a failed answer's error code maps to the API's status.
ERROR_STATUS = {"llm_unreachable": 503, "llm_timeout": 504, "model_not_found": 404, "upstream_error": 502,
                "interrupted": 503, "internal_error": 500}

OPTION_RULES = {  # name: (type, min, max)
    "temperature": (float, 0.0, 2.0), "top_p": (float, 0.0, 1.0), "seed": (int, 0, 2**31 - 1),
    "num_predict": (int, 1, 16384), "num_ctx": (int, 256, 262144),
}


def parse_options(raw):
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise chat.ChatError(422, "invalid_field", "options must be an object", "options")
    options = {}
    for name, value in raw.items():
        if name not in OPTION_RULES:
            raise chat.ChatError(422, "invalid_field", f"unknown option '{name}'", f"options.{name}")
        kind, low, high = OPTION_RULES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise chat.ChatError(422, "invalid_field", f"options.{name} must be a number", f"options.{name}")
        if kind is int and not float(value).is_integer():  # 4096.0 is an integer in JSON, as in JSON Schema
            raise chat.ChatError(422, "invalid_field", f"options.{name} must be an integer", f"options.{name}")
        if not low <= value <= high:
            raise chat.ChatError(422, "invalid_field", f"options.{name} must be between {low} and {high}",
                                 f"options.{name}")
        options[name] = kind(value)
    return options


def parse_turn_request(data):
    conversation_id = data.get("conversation_id")
    if conversation_id is not None and (isinstance(conversation_id, bool) or not isinstance(conversation_id, int)):
        raise chat.ChatError(422, "invalid_field", "conversation_id must be an integer", "conversation_id")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise chat.ChatError(422, "invalid_field", "stream must be true or false", "stream")
    return conversation_id, stream, parse_options(data.get("options"))


def turn_result(message, prompt=None):
    """What a finished turn answers: the same object whether streamed or not."""
    return {
        "request_id": g.get("request_id"),
        "prompt": prompt,
        "response": message.content,
        "conversation_id": message.conversation_id,
        "message_id": message.id,
        "model": message.model,
        "status": message.status,
        "done_reason": message.done_reason,
        "error": {"code": message.error_code, "message": message.error} if message.error_code else None,
        "usage": usage_dict(message),
    }


@bp.post("/chat/")
@token_required
def chat_turn():
    data = json_body()
    conversation_id, stream, options = parse_turn_request(data)
    turn = chat.start_turn(g.api_user, data.get("prompt"), conversation_id, data.get("model"),
                           g.request_id, options)
    prompt = turn.prompt
    ids = {"request_id": g.request_id, "conversation_id": turn.conversation_id,
           "message_id": turn.message_id, "user_message_id": turn.user_message_id, "model": turn.model}
    if stream:
        return sse.response(stream_turn(ids, prompt))
    final = chat.wait_final(ids["message_id"])
    return finished_response(final, prompt, ids["user_message_id"])


def finished_response(final, prompt, user_message_id=None):
    if final is None:  # the conversation was deleted while the answer was being generated
        return error_response(404, "not_found", "the conversation was deleted during the answer")
    result = turn_result(final, prompt)
    result["user_message_id"] = user_message_id
    if final.status in (COMPLETE, CANCELLED):
        return jsonify(result)
    # A failed answer: the prompt and the partial answer are saved; say so alongside the error.
    status = ERROR_STATUS.get(final.error_code, 502)
    return error_response(status, final.error_code or "upstream_error", final.error or "the model failed",
                          conversation_id=final.conversation_id, message_id=final.id,
                          user_message_id=user_message_id, partial_response=final.content)


def stream_turn(ids, prompt=None):
    """start, token…, then done (or error): every event's data is JSON. Used for new turns,
    regenerations and re-attaching alike; following replays from the first token."""
    yield sse.event("start", ids)
    yield from follow_frames(ids["message_id"], prompt)


def follow_frames(message_id, prompt=None):
    for kind, value in chat.follow(message_id):
        if kind == "token":
            yield sse.event("token", {"text": value})
        elif kind == "ping":
            yield sse.PING
        elif kind == "done":
            result = turn_result(value, prompt)
            yield sse.event("done" if value.status in (COMPLETE, CANCELLED) else "error", result)
