"""The chat pages and their htmx fragments. Thin: parse, check who asks, call the chat service, render.

Every form works as a plain HTML form (POST, then redirect); with htmx the same URLs answer
fragments. Errors on htmx requests are swapped into the composer's error slot (HX-Retarget), on
plain requests the page is rendered again with the message and what the person typed.
"""
import time

from flask import abort, current_app, g, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf.csrf import CSRFError

from .. import chat, llm, sse
from ..downloads import markdown_file
from ..markdown import render as render_markdown
from ..extensions import db
from ..models import ACTIVE_STATUSES, Conversation, usage_dict
from . import bp
from .errors import csrf_failure, not_found_page

SIDEBAR_PAGE = 30
MESSAGE_PAGE = 40
RENDER_INTERVAL = 0.1  # seconds between HTML snapshots while an answer streams (at most ~10 renders/s)
QUERY_LIMIT = 200

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
    return {"friendly_error": friendly_error, "usage_of": usage_dict,
            "is_active": lambda m: m.status in ACTIVE_STATUSES}


def friendly_error(message):
    """Known failures in plain words; an unknown code falls back to the saved reason."""
    return FRIENDLY_ERRORS.get(message.error_code) or message.error or "The answer failed."


def is_htmx():
    return request.headers.get("HX-Request") == "true"


def user():
    return current_user._get_current_object()


def search_query():
    return request.args.get("q", "").strip()[:QUERY_LIMIT]


def models_or_none():
    """The model list for the picker, or None when the model server is down (the page still works)."""
    try:
        return [m["name"] for m in chat.list_models()]
    except llm.LLMError:
        return None


def owned(call, *args, **kwargs):
    """Run a service call; someone else's (or a missing) id answers the same 404 page."""
    try:
        return call(*args, **kwargs)
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        raise


# ---- pages -----------------------------------------------------------------------------------------

@bp.get("/")
@login_required
def index():
    """The newest conversation, or the empty "new chat" state (?new=1, or no chats yet)."""
    query = search_query()
    if not request.args.get("new"):
        page, _ = chat.list_conversations(user(), limit=1)
        if page:
            return redirect(url_for("web.conversation", conversation_id=page[0].id, q=query or None))
    return render_chat(None)


@bp.get("/c/<int:conversation_id>")
@login_required
def conversation(conversation_id):
    return render_chat(conversation_id)


def render_chat(conversation_id, error=None, draft="", status=200):
    """The whole page. `q`, `cursor` and `before` in the query string let the sidebar search, the
    sidebar's "load more" and "load older messages" work as plain links when JavaScript is off."""
    conversation, messages, older = None, [], None
    if conversation_id is not None:
        conversation, messages, older = owned(chat.list_messages, user(), conversation_id, limit=MESSAGE_PAGE,
                                              before=request.args.get("before", type=int))
    query = search_query()
    sidebar, next_cursor = chat.list_conversations(user(), limit=SIDEBAR_PAGE, cursor=request.args.get("cursor"),
                                                   query=query or None)
    busy = any(m.status in ACTIVE_STATUSES for m in messages)
    return render_template("chat.html", conversation=conversation, messages=messages, older=older,
                           sidebar=sidebar, next_cursor=next_cursor, query=query, models=models_or_none(),
                           default_model=conversation.model if conversation else current_app.config["DEFAULT_MODEL"],
                           error=error, draft=draft, busy=busy), status


# ---- fragments ----------------------------------------------------------------------------------

@bp.get("/sidebar")
@login_required
def sidebar():
    """One page of the conversation list (search and infinite scroll both land here)."""
    query = search_query()
    items, next_cursor = chat.list_conversations(user(), limit=SIDEBAR_PAGE, cursor=request.args.get("cursor"),
                                                 query=query or None)
    return render_template("_sidebar_page.html", sidebar=items, next_cursor=next_cursor, query=query,
                           current_id=request.args.get("current", type=int))


@bp.get("/c/<int:conversation_id>/older")
@login_required
def older_messages(conversation_id):
    before = request.args.get("before", type=int)
    if not is_htmx():  # a plain link: the page itself, starting further back
        return redirect(url_for("web.conversation", conversation_id=conversation_id, before=before))
    conversation, messages, older = owned(chat.list_messages, user(), conversation_id, limit=MESSAGE_PAGE,
                                          before=before)
    return render_template("_older.html", conversation=conversation, messages=messages, older=older)


@bp.get("/status")
@login_required
def status():
    """The header's model-server indicator (htmx polls it)."""
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
    if is_htmx():  # a new conversation means a new page (sidebar, header, URL)
        return "", 204, {"HX-Redirect": target}
    return redirect(target)


@bp.post("/c/<int:conversation_id>/messages")
@login_required
def send(conversation_id):
    prompt, model = request.form.get("prompt", ""), request.form.get("model") or None
    conversation = owned(chat.get_conversation, user(), conversation_id)
    try:
        if model and model != conversation.model:  # the picker changes the conversation's model
            chat.update_conversation(user(), conversation_id, model=model)
        turn = chat.start_turn(user(), prompt, conversation_id, request_id=g.request_id)
    except chat.ChatError as exc:
        if exc.status == 404:  # deleted meanwhile
            abort(404)
        return turn_error(conversation_id, exc, prompt)
    if not is_htmx():
        return redirect(url_for("web.conversation", conversation_id=conversation_id))
    return render_template("_turn.html", user_message=chat.get_message(user(), turn.user_message_id),
                           answer=chat.get_message(user(), turn.message_id),
                           conversation=chat.get_conversation(user(), conversation_id))


def turn_error(conversation_id, exc, draft):
    """Say what went wrong and keep what the person typed (htmx leaves the textarea alone)."""
    if is_htmx():
        return (render_template("_composer_error.html", message=exc.message), 200,
                {"HX-Retarget": "#composer-error", "HX-Reswap": "innerHTML"})
    return render_chat(conversation_id, error=exc.message, draft=draft, status=exc.status)


@bp.post("/c/<int:conversation_id>/stop")
@login_required
def stop(conversation_id):
    """Stop the running answer. The answer's own SSE stream then delivers the "Stopped." bubble."""
    try:
        chat.stop(user(), conversation_id)
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        # 409 "not generating": it already ended by itself, which is what the person wanted
    if is_htmx():
        return "", 204
    return redirect(url_for("web.conversation", conversation_id=conversation_id))


@bp.post("/c/<int:conversation_id>/regenerate")
@login_required
def regenerate(conversation_id):
    """Answer the last prompt again; with htmx the new (streaming) bubble replaces the old one."""
    owned(chat.get_conversation, user(), conversation_id)
    try:
        turn = chat.regenerate(user(), conversation_id, request_id=g.request_id)
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        return turn_error(conversation_id, exc, "")
    if not is_htmx():
        return redirect(url_for("web.conversation", conversation_id=conversation_id))
    return render_template("_message.html", message=chat.get_message(user(), turn.message_id), last=True)


@bp.get("/c/<int:conversation_id>/m/<int:message_id>/events")
@login_required
def events(conversation_id, message_id):
    """SSE for one answer: `html` snapshots of the rendered text so far, then `done` with the final
    message fragment. Replays from the start, so reconnecting after a reload shows everything."""
    message = owned(chat.get_message, user(), message_id)
    if message.conversation_id != conversation_id:
        abort(404)
    return sse.response(answer_frames(message_id, conversation_id))


def sidebar_item(conversation_id):
    """The conversation's sidebar entry as it is now ("answering…", message count), or "" if gone."""
    conversation = db.session.get(Conversation, conversation_id)
    html = "" if conversation is None else render_template("_conversation_item.html", item=conversation,
                                                           current_id=conversation_id)
    db.session.rollback()  # release the connection: the stream may stay open for minutes
    return html


def answer_frames(message_id, conversation_id):
    """Render the whole answer so far on a token, unless the last render was under RENDER_INTERVAL
    ago (markdown must be re-rendered whole: a later token can close an open code fence). The final
    `done` frame always carries the complete text, so a skipped snapshot is never lost."""
    text, rendered, last_render = "", "", 0.0
    # The sidebar entry says "answering…" now and loses it at the end, without a reload.
    yield sse.event("item", {"html": sidebar_item(conversation_id)})
    for kind, value in chat.follow(message_id):
        if kind == "token":
            text += value
        if kind in ("token", "idle") and text != rendered and time.monotonic() - last_render >= RENDER_INTERVAL:
            # On "idle" too: a tail held back by the throttle shows even if the model then pauses.
            yield sse.event("html", {"html": str(render_markdown(text))})
            rendered, last_render = text, time.monotonic()
        elif kind == "ping":
            yield sse.PING  # lets the server notice a reader that went away
        elif kind == "done":
            html = render_template("_message.html", message=value, last=True)
            yield sse.event("done", {"html": html, "status": value.status, "item": sidebar_item(conversation_id)})
            return
    # follow() ends without "done" only if the conversation was deleted meanwhile
    yield sse.event("gone", {"html": ""})


# ---- conversation settings ---------------------------------------------------------------------

@bp.post("/c/<int:conversation_id>/rename")
@login_required
def rename(conversation_id):
    owned(chat.get_conversation, user(), conversation_id)
    try:
        conversation = chat.update_conversation(user(), conversation_id, title=request.form.get("title", ""))
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        conversation = chat.get_conversation(user(), conversation_id)  # e.g. an empty title: keep the old one
    if is_htmx():
        return render_template("_conversation_item.html", item=conversation, current_id=conversation_id)
    return redirect(url_for("web.conversation", conversation_id=conversation_id))


@bp.get("/c/<int:conversation_id>/export")
@login_required
def export(conversation_id):
    return markdown_file(*owned(chat.export_markdown, user(), conversation_id))


@bp.post("/c/<int:conversation_id>/delete")
@login_required
def delete(conversation_id):
    owned(chat.delete_conversation, user(), conversation_id)
    if is_htmx():
        return "", 204, {"HX-Redirect": url_for("web.index")}
    return redirect(url_for("web.index"))


@bp.post("/c/<int:conversation_id>/settings")
@login_required
def settings(conversation_id):
    """The per-conversation model and system prompt."""
    owned(chat.get_conversation, user(), conversation_id)
    try:
        chat.update_conversation(user(), conversation_id, model=request.form.get("model") or None,
                                 system_prompt=request.form.get("system_prompt", ""))
    except chat.ChatError as exc:
        if exc.status == 404:
            abort(404)
        return turn_error(conversation_id, exc, "")
    target = url_for("web.conversation", conversation_id=conversation_id)
    if is_htmx():
        return "", 204, {"HX-Redirect": target}
    return redirect(target)


bp.app_errorhandler(CSRFError)(csrf_failure)


@bp.errorhandler(chat.ChatError)
def chat_error(exc):
    """A refusal that reached no view-level handler, e.g. a bad sidebar cursor."""
    if exc.status == 404:  # someone else's id looks exactly like a missing one
        return not_found_page()
    if is_htmx():
        return render_template("_composer_error.html", message=exc.message), exc.status
    return render_template("error.html", code=exc.status, title="That didn't work", message=exc.message), exc.status
