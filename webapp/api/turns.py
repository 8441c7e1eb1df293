"""POST /chat/: one turn, answered whole as JSON or streamed as Server-Sent Events."""
from flask import g, jsonify

from .. import service, sse, stream_auth
from ..errors import ANSWER_ERROR_STATUS, invalid
from . import bp
from .errors import error_response
from .guard import credential, idempotency_key, json_body, mark_replayed, token_checked_by_the_start


def parse_options(raw):
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid("options", "options must be an object")
    options, rules = {}, service.option_rules()  # with the operator's ceilings
    for name, value in raw.items():
        field = f"options.{name}"
        if name not in rules:
            raise invalid(field, f"unknown option '{name}'")
        kind, low, high = rules[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(field, f"{field} must be a number")
        if kind is int and not float(value).is_integer():  # 4096.0 is an integer in JSON, as in JSON Schema
            raise invalid(field, f"{field} must be an integer")
        if not low <= value <= high:
            raise invalid(field, f"{field} must be between {low} and {high}")
        options[name] = kind(value)
    return options


def parse_turn_request(data):
    conversation_id = data.get("conversation_id")
    if conversation_id is not None and (isinstance(conversation_id, bool) or not isinstance(conversation_id, int)):
        raise invalid("conversation_id", "conversation_id must be an integer")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "stream must be true or false")
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
        "usage": service.usage_dict(message),
    }


def stream_ids(conversation_id, message_id, model, user_message_id=None):
    """The `start` event of every answer stream."""
    return {"request_id": g.request_id, "conversation_id": conversation_id, "message_id": message_id,
            "user_message_id": user_message_id, "model": model}


@bp.post("/chat/")
@bp.post("/chat", endpoint="chat_turn_without_slash")  # a JSON client never lands on a page
@token_checked_by_the_start
def chat_turn():
    data = json_body()
    conversation_id, stream, options = parse_turn_request(data)
    key = idempotency_key()
    # A retried stream may say how far it got (the same ids as every stream); read before anything starts.
    since = sse.last_event_id() if key and stream else None
    # Not streamed: the request generates the answer itself (service.answer_here), no hand-off.
    turn = service.start_turn(credential(), data.get("prompt"), conversation_id, data.get("model"),
                              g.request_id, options, idempotency_key=key, run_here=not stream)
    if turn.replayed:
        mark_replayed()
    if stream:
        if not turn.replayed:
            since = None  # the client's offset belongs to no answer of this key (a new request, or expired)
        elif sse.at_end(not service.is_active(turn.answer), len(turn.answer.content), since):
            return sse.finished()
        ids = stream_ids(turn.conversation_id, turn.message_id, turn.model, turn.user_message_id)
        return sse.response(stream_turn(ids, turn.prompt, since=since or 0))
    return finished_response(service.answer_here(turn), turn.prompt, turn.user_message_id)


def finished_response(final, prompt, user_message_id=None):
    if final is None:  # the conversation was deleted while the answer was being generated
        return error_response(404, "not_found", "the conversation was deleted during the answer")
    result = turn_result(final, prompt)
    result["user_message_id"] = user_message_id
    if service.is_answered(final):
        return jsonify(result)
    # A failed answer: the prompt and the partial answer are saved; say so alongside the error.
    status = ANSWER_ERROR_STATUS.get(final.error_code, 502)
    return error_response(status, final.error_code or "upstream_error", final.error or "the model failed",
                          conversation_id=final.conversation_id, message_id=final.id,
                          user_message_id=user_message_id, partial_response=final.content)


def stream_turn(ids, prompt=None, since=0):
    """start, queued… (while waiting for the model), token…, then done (or failed): every event's
    data is JSON and its `id:` is the answer's character offset after it, so a client that lost the
    connection resumes with `Last-Event-ID` (through GET …/messages/<id>/stream) exactly where it
    was. Used for new turns, regenerations and re-attaching alike; `since` is that offset (0: replay
    from the first token)."""
    offset = since
    yield sse.event("start", ids, id=offset, retry=sse.RETRY_MS)
    watch = stream_auth.watch()
    for kind, value in service.follow(ids["message_id"], since=since):
        if not watch.still_allowed():  # signed out, token revoked or account disabled meanwhile
            yield watch.ended()
            return
        if kind == "queued":  # no id: the place in line is not a position in the answer
            yield sse.event("queued", {"position": value})
        elif kind == "token":
            offset += len(value)
            yield sse.event("token", {"text": value}, id=offset)
        elif kind == "ping":
            yield sse.PING
        elif kind == "done":
            yield sse.event("done" if service.is_answered(value) else "failed", turn_result(value, prompt),
                            id=max(offset, len(value.content)))
