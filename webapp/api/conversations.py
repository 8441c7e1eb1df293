"""The caller's conversations: list, create, read (paginated), change, delete, stop, regenerate,
and re-attach to a live answer. Every id is looked up through the caller: others' ids answer 404."""
from flask import g, jsonify, request

from .. import chat, sse
from ..downloads import markdown_file
from . import bp
from .chat import finished_response, parse_options, stream_turn, turn_result
from .guard import json_body, token_required


def int_arg(name, default, low, high):
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise chat.ChatError(400, "invalid_field", f"{name} must be an integer from {low} to {high}", name)
    return int(raw)


@bp.get("/conversations")
@token_required
def list_conversations():
    page, next_cursor = chat.list_conversations(g.api_user, limit=int_arg("limit", 20, 1, 100),
                                                cursor=request.args.get("cursor"), query=request.args.get("q"))
    return jsonify({"conversations": [c.to_dict() for c in page], "next_cursor": next_cursor})


@bp.post("/conversations")
@token_required
def create_conversation():
    data = json_body() if request.content_length else {}
    # A field that is sent must be a string; only a missing one takes the default.
    title = chat.clean_text_field(data["title"], "title", 200) if "title" in data else ""
    model = chat.clean_text_field(data["model"], "model", 200, False) if "model" in data else None
    system_prompt = chat.clean_text_field(data.get("system_prompt", ""), "system_prompt", 8000)
    conversation = chat.create_conversation(g.api_user, title, model, system_prompt)
    return jsonify(conversation.to_dict()), 201


@bp.get("/conversations/<int:conversation_id>")
@token_required
def get_conversation(conversation_id):
    before = int_arg("before", None, 1, chat.MAX_ID)
    conversation, messages, older = chat.list_messages(g.api_user, conversation_id,
                                                       limit=int_arg("limit", 50, 1, 200), before=before)
    return jsonify({**conversation.to_dict(), "messages": [m.to_dict() for m in messages],
                    "older_cursor": older})


@bp.patch("/conversations/<int:conversation_id>")
@token_required
def update_conversation(conversation_id):
    data = json_body()
    for name in ("title", "model", "system_prompt"):
        if name in data and not isinstance(data[name], str):  # null is not "leave it alone": say so
            raise chat.ChatError(422, "invalid_field", f"{name} must be a string", name)
    conversation = chat.update_conversation(g.api_user, conversation_id, title=data.get("title"),
                                            model=data.get("model"), system_prompt=data.get("system_prompt"))
    return jsonify(conversation.to_dict())


@bp.get("/conversations/<int:conversation_id>/export")
@token_required
def export_conversation(conversation_id):
    return markdown_file(*chat.export_markdown(g.api_user, conversation_id))


@bp.delete("/conversations/<int:conversation_id>")
@token_required
def delete_conversation(conversation_id):
    chat.delete_conversation(g.api_user, conversation_id)
    return "", 204


@bp.post("/conversations/<int:conversation_id>/stop")
@token_required
def stop(conversation_id):
    message = chat.stop(g.api_user, conversation_id)
    return jsonify(turn_result(message))


@bp.post("/conversations/<int:conversation_id>/regenerate")
@token_required
def regenerate(conversation_id):
    data = json_body() if request.content_length else {}
    turn = chat.regenerate(g.api_user, conversation_id, data.get("model"), g.request_id,
                           parse_options(data.get("options")))
    message_id = turn.message_id
    if data.get("stream"):
        ids = {"request_id": g.request_id, "conversation_id": conversation_id, "message_id": message_id,
               "user_message_id": None, "model": turn.model}
        return sse.response(stream_turn(ids))
    return finished_response(chat.wait_final(message_id), None)


@bp.get("/conversations/<int:conversation_id>/messages/<int:message_id>")
@token_required
def get_message(conversation_id, message_id):
    message = _owned_message(conversation_id, message_id)
    return jsonify(message.to_dict())


@bp.get("/conversations/<int:conversation_id>/messages/<int:message_id>/stream")
@token_required
def reattach(conversation_id, message_id):
    """Replay the answer so far and keep streaming until it is final (works from any worker)."""
    message = _owned_message(conversation_id, message_id)
    ids = {"request_id": g.request_id, "conversation_id": message.conversation_id, "message_id": message.id,
           "user_message_id": None, "model": message.model}
    return sse.response(stream_turn(ids))


def _owned_message(conversation_id, message_id):
    message = chat.get_message(g.api_user, message_id)
    if message.conversation_id != conversation_id:
        raise chat.ChatError(404, "not_found", "message not found", "message_id")
    return message
