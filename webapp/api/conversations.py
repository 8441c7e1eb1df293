"""The caller's conversations: list, create, read (paginated), change, delete, stop, regenerate,
and re-attach to a live answer. Every id is looked up through the caller: others' ids answer 404."""
from flask import g, jsonify, request

from .. import service, sse
from ..downloads import markdown_file
from ..errors import ServiceError, invalid
from ..limits import CONVERSATION_PAGE, MAX_ID, MESSAGE_PAGE, TITLE_MAX
from . import bp
from .guard import json_body, token_required
from .turns import finished_response, parse_options, stream_ids, stream_turn, turn_result


def int_arg(name, default, low, high):
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ServiceError(400, "invalid_field", f"{name} must be an integer from {low} to {high}", name)
    return int(raw)


@bp.get("/conversations")
@token_required
def list_conversations():
    default, most = CONVERSATION_PAGE
    page, next_cursor = service.list_conversations(g.api_user, limit=int_arg("limit", default, 1, most),
                                                cursor=request.args.get("cursor"), query=request.args.get("q"),
                                                source=request.args.get("source"))
    return jsonify({"conversations": [c.to_dict() for c in page], "next_cursor": next_cursor})


@bp.post("/conversations")
@token_required
def create_conversation():
    data = json_body(optional=True)
    # A field that is sent must be a string; only a missing one takes the default.
    title = service.clean_text(data["title"], "title", TITLE_MAX, False) if "title" in data else ""
    model = service.check_model(data["model"]) if "model" in data else None
    system_prompt = service.clean_system_prompt(data.get("system_prompt", ""))
    conversation = service.create_conversation(g.api_user, title, model, system_prompt)
    return jsonify(conversation.to_dict()), 201


@bp.get("/conversations/<int:conversation_id>")
@token_required
def get_conversation(conversation_id):
    before = int_arg("before", None, 1, MAX_ID)
    default, most = MESSAGE_PAGE
    conversation, messages, older = service.list_messages(g.api_user, conversation_id,
                                                          limit=int_arg("limit", default, 1, most), before=before)
    return jsonify({**conversation.to_dict(), "messages": [m.to_dict() for m in messages],
                    "older_cursor": older})


@bp.patch("/conversations/<int:conversation_id>")
@token_required
def update_conversation(conversation_id):
    data = json_body()
    for name in ("title", "model", "system_prompt"):
        if name in data and not isinstance(data[name], str):  # null is not "leave it alone": say so
            raise invalid(name, f"{name} must be a string")
    conversation = service.update_conversation(g.api_user, conversation_id, title=data.get("title"),
                                            model=data.get("model"), system_prompt=data.get("system_prompt"))
    return jsonify(conversation.to_dict())


@bp.get("/conversations/<int:conversation_id>/export")
@token_required
def export_conversation(conversation_id):
    return markdown_file(*service.export_markdown(g.api_user, conversation_id))


@bp.delete("/conversations/<int:conversation_id>")
@token_required
def delete_conversation(conversation_id):
    service.delete_conversation(g.api_user, conversation_id)
    return "", 204


@bp.post("/conversations/<int:conversation_id>/stop")
@token_required
def stop(conversation_id):
    message_id = service.stop(g.api_user, conversation_id)
    return jsonify(turn_result(service.wait_final(message_id, timeout=5.0)))


@bp.post("/conversations/<int:conversation_id>/regenerate")
@token_required
def regenerate(conversation_id):
    data = json_body(optional=True)
    stream = bool(data.get("stream"))
    turn = service.regenerate(g.api_user, conversation_id, data.get("model"), g.request_id,
                              parse_options(data.get("options")), run_here=not stream)
    if stream:
        return sse.response(stream_turn(stream_ids(conversation_id, turn.message_id, turn.model)))
    return finished_response(service.answer_here(turn), None)


@bp.get("/conversations/<int:conversation_id>/messages/<int:message_id>")
@token_required
def get_message(conversation_id, message_id):
    return jsonify(service.get_message(g.api_user, message_id, conversation_id).to_dict())


@bp.get("/conversations/<int:conversation_id>/messages/<int:message_id>/stream")
@token_required
def reattach(conversation_id, message_id):
    """Replay the answer so far, or from `Last-Event-ID` on, and keep streaming until it is final
    (works from any worker). Already at the end of a finished answer: 204, so EventSource stops."""
    since = sse.last_event_id()
    message = service.get_message(g.api_user, message_id, conversation_id)
    ids = stream_ids(conversation_id, message.id, message.model)
    final, length = not service.is_active(message), len(message.content)
    service.end_reads()  # the stream may stay open for minutes: no connection held meanwhile
    if sse.at_end(final, length, since):
        return sse.finished()
    return sse.response(stream_turn(ids, since=since or 0))
