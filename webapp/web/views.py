"""The chat pages and their htmx fragments. Thin: parse, check who asks, call the chat service, render.

Every form works as a plain HTML form (POST, then redirect); with htmx the same URLs answer
fragments. Errors on htmx requests are swapped into the composer's error slot (HX-Retarget), on
plain requests the page is rendered again with the message and what the person typed.
"""
import time

from werkzeug.exceptions import NotFound

from flask import abort, g, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import chat, llm, sse
from ..markdown import render as render_markdown
from ..models import ACTIVE_STATUSES, usage_dict
from . import bp
from .errors import http_error_page

SIDEBAR_PAGE = 30
MESSAGE_PAGE = 40
RENDER_INTERVAL = 0.1  # seconds between HTML snapshots while an answer streams

# Plain words for what went wrong, by the message's error code.
FRIENDLY_ERRORS = {
    "llm_unreachable": "The model server can't be reached right now. Is Ollama running?",
    "llm_timeout": "The model took too long to answer.",
    "model_not_found": "That model isn't installed on the model server (try `ollama pull`).",
    "upstream_error": "The model server failed while answering.",
    "interrupted": "The server restarted while answering; the text so far is kept.",
    "internal_error": "Something went wrong on our side.",
}


@bp.app_template_filter("markdown")
def markdown_filter(text):
    return render_markdown(text)


@bp.app_context_processor
def helpers():
    return {"friendly_error": lambda m: FRIENDLY_ERRORS.get(m.error_code, m.error or "The answer failed."),
            "usage_of": usage_dict, "is_active": lambda m: m.status in ACTIVE_STATUSES}


def is_htmx():
    return request.headers.get("HX-Request") == "true"


def user():
    return current_user._get_current_object()


def models_or_none():
    """The model list for the picker, or None when the model server is down (the page still works)."""
    try:
        return [m["name"] for m in chat.list_models()]
    except llm.LLMError:
        return None


# ---- pages -----------------------------------------------------------------------------------------

@bp.get("/")
@login_required
def index():
    page, _ = chat.list_conversations(user(), limit=1)
    if page and not request.args.get("new"):
        return redirect(url_for("web.conversation", conversation_id=page[0].id))
    return render_chat(None)


@bp.get("/c/<int:conversation_id>")
@login_required
def conversation(conversation_id):
    return render_chat(conversation_id)


def render_chat(conversation_id, error=None, draft="", status=200):
    conversation, messages, older = None, [], None
    if conversation_id is not None:
        conversation, messages, older = chat.list_messages(user(), conversation_id, limit=MESSAGE_PAGE)
    sidebar, next_cursor = chat.list_conversations(user(), limit=SIDEBAR_PAGE)
    return render_template("chat.html", conversation=conversation, messages=messages, older=older,
                           sidebar=sidebar, next_cursor=next_cursor, query="", models=models_or_none(),
                           default_model=conversation.model if conversation else
                           chat.current_app.config["DEFAULT_MODEL"], error=error, draft=draft), status


# ---- fragments ----------------------------------------------------------------------------------

@bp.get("/sidebar")
@login_required
def sidebar():
    query = request.args.get("q", "").strip()[:200]
    items, next_cursor = chat.list_conversations(user(), limit=SIDEBAR_PAGE, cursor=request.args.get("cursor"),
                                                 query=query or None)
    return render_template("_sidebar_items.html", sidebar=items, next_cursor=next_cursor, query=query,
                           current_id=request.args.get("current", type=int))


@bp.get("/c/<int:conversation_id>/older")
@login_required
def older_messages(conversation_id):
    before = request.args.get("before", type=int)
    conversation, messages, older = chat.list_messages(user(), conversation_id, limit=MESSAGE_PAGE, before=before)
    return render_template("_older.html", conversation=conversation, messages=messages, older=older)


@bp.get("/status")
@login_required
def status():
    try:
        chat.client().health()
        reachable = True
    except llm.LLMError:
        reachable = False
    return render_template("_status.html", reachable=reachable)


# ---- a turn ----------------------------------------------------------------------------------------

@bp.post("/chat")
@login_required
def new_chat():
    """The first message of a new conversation."""
    prompt, model = request.form.get("prompt", ""), request.form.get("model") or None
    try:
        turn = chat.start_turn(user(), prompt, model=model, request_id=g.request_id)
    except chat.ChatError as exc:
        return turn_error(None, exc, prompt)
    target = url_for("web.conversation", conversation_id=turn.conversation_id)
    if is_htmx():
        return "", 204, {"HX-Redirect": target}
    return redirect(target)


@bp.post("/c/<int:conversation_id>/messages")
@login_required
def send(conversation_id):
    prompt, model = request.form.get("prompt", ""), request.form.get("model") or None
    try:
        conversation = chat.get_conversation(user(), conversation_id)
        if model and model != conversation.model:
            chat.update_conversation(user(), conversation_id, model=model)
        turn = chat.start_turn(user(), prompt, conversation_id, request_id=g.request_id)
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        return turn_error(conversation_id, exc, prompt)
    if not is_htmx():
        return redirect(url_for("web.conversation", conversation_id=conversation_id))
    return render_template("_turn.html", conversation_id=conversation_id,
                           user_message=chat.get_message(user(), turn.user_message_id),
                           answer=chat.get_message(user(), turn.message_id))


def turn_error(conversation_id, exc, draft):
    """Say what went wrong and keep what the person typed."""
    if is_htmx():
        return (render_template("_composer_error.html", message=exc.message), 200,
                {"HX-Retarget": "#composer-error", "HX-Reswap": "innerHTML"})
    return render_chat(conversation_id, error=exc.message, draft=draft, status=exc.status)


@bp.post("/c/<int:conversation_id>/stop")
@login_required
def stop(conversation_id):
    try:
        chat.stop(user(), conversation_id)
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)  # someone else's; "not generating" is fine: it already ended
    return back_to(conversation_id)


@bp.post("/c/<int:conversation_id>/regenerate")
@login_required
def regenerate(conversation_id):
    try:
        chat.regenerate(user(), conversation_id, request_id=g.request_id)
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        return turn_error(conversation_id, exc, "")
    return back_to(conversation_id, reload=True)


def back_to(conversation_id, reload=False):
    target = url_for("web.conversation", conversation_id=conversation_id)
    if is_htmx():
        return "", 204, ({"HX-Redirect": target} if reload else {})
    return redirect(target)


@bp.get("/c/<int:conversation_id>/m/<int:message_id>/events")
@login_required
def events(conversation_id, message_id):
    """SSE for one answer: `html` snapshots of the rendered text so far, then `done` with the final
    message fragment. Replays from the start, so reconnecting after a reload shows everything."""
    message = chat.get_message(user(), message_id)
    if message.conversation_id != conversation_id:
        abort(404)
    owner = user()
    return sse.response(answer_frames(owner, message_id))


def answer_frames(owner, message_id):
    text, last_render = "", 0.0
    for kind, value in chat.follow(message_id):
        if kind == "token":
            text += value
            if time.monotonic() - last_render >= RENDER_INTERVAL:
                yield sse.event("html", {"html": str(render_markdown(text))})
                last_render = time.monotonic()
        elif kind == "ping":
            yield sse.PING
        elif kind == "done":
            html = render_template("_message.html", message=value, last=True)
            yield sse.event("done", {"html": html, "status": value.status})


# ---- conversation settings ---------------------------------------------------------------------

@bp.post("/c/<int:conversation_id>/rename")
@login_required
def rename(conversation_id):
    try:
        conversation = chat.update_conversation(user(), conversation_id, title=request.form.get("title", ""))
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        conversation = chat.get_conversation(user(), conversation_id)
    if is_htmx():
        return render_template("_sidebar_item.html", item=conversation, current_id=conversation_id)
    return redirect(url_for("web.conversation", conversation_id=conversation_id))


@bp.post("/c/<int:conversation_id>/delete")
@login_required
def delete(conversation_id):
    chat.delete_conversation(user(), conversation_id)
    if is_htmx():
        return "", 204, {"HX-Redirect": url_for("web.index")}
    return redirect(url_for("web.index"))


@bp.post("/c/<int:conversation_id>/settings")
@login_required
def settings(conversation_id):
    try:
        chat.update_conversation(user(), conversation_id, model=request.form.get("model") or None,
                                 system_prompt=request.form.get("system_prompt", ""))
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        return turn_error(conversation_id, exc, "")
    return back_to(conversation_id, reload=True)


@bp.errorhandler(chat.ChatError)
def chat_error(exc):
    if exc.status == 404:  # someone else's id looks exactly like a missing one
        return http_error_page(NotFound())
    return render_template("error.html", code=exc.status, title="That didn't work", message=exc.message), exc.status
