"""The chat pages and their htmx fragments. Thin: parse, check who asks, call the chat service, render.

Every form works as a plain HTML form (POST, then redirect); with htmx the same URLs answer
fragments. A refusal raised here is rendered by webapp/web/errors.py in the action's own slot.
"""
import time

from flask import current_app, g, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf.csrf import CSRFError

from .. import limits, service, sse, stream_auth
from ..downloads import markdown_file
from ..errors import LLMError, ServiceError
from ..extensions import llm_service
from ..markdown import render as render_markdown
from . import bp
from .errors import csrf_failure
from .htmx import go_to, is_htmx, retarget

SIDEBAR_PAGE = 30
MESSAGE_PAGE = 40
RENDER_INTERVAL = 0.1  # seconds between HTML snapshots while an answer streams (at most ~10 renders/s)

# Plain words for what went wrong, by the message's error code.
FRIENDLY_ERRORS = {
    "llm_unreachable": "The model server can't be reached right now. Is Ollama running?",
    "llm_timeout": "The model took too long to answer.",
    "model_not_found": "That model isn't installed on the model server (try `ollama pull`).",
    "upstream_error": "The model server failed while answering.",
    "interrupted": "The server restarted while answering; the text so far is kept.",
    "queue_timeout": "The model was busy with other people's answers for too long. Try again in a while.",
    "internal_error": "Something went wrong on our side.",
}


@bp.app_template_filter("markdown")
def markdown_filter(text):
    return render_markdown(text)


@bp.app_context_processor
def helpers():
    return {"friendly_error": friendly_error, "usage_of": service.usage_dict, "is_active": service.is_active,
            "limits": limits}


def friendly_error(message):
    """Known failures in plain words; an unknown code falls back to the saved reason."""
    return FRIENDLY_ERRORS.get(message.error_code) or message.error or "The answer failed."


def user():
    return current_user._get_current_object()


def search_query():
    return request.args.get("q", "").strip()[:limits.SEARCH_QUERY_MAX]


def id_arg(name):
    value = request.args.get(name, "")
    return int(value) if value.isascii() and value.isdigit() and 0 < int(value) <= limits.MAX_ID else None


def models_or_none():
    """The model list for the picker, or None when the model server is down (the page still works)."""
    try:
        return [m["name"] for m in llm_service.list_models()]
    except LLMError:
        return None


# ---- pages -----------------------------------------------------------------------------------------

@bp.get("/")
@login_required
def index():
    """The newest conversation, or the empty "new chat" state (?new=1, or no chats yet)."""
    query = search_query()
    if not request.args.get("new"):
        page, _ = service.list_conversations(user(), limit=1)
        if page:
            return redirect(url_for("web.conversation", conversation_id=page[0].id, q=query or None))
    return render_chat(None)


@bp.get("/c/<int:conversation_id>")
@login_required
def conversation(conversation_id):
    return render_chat(conversation_id)


def render_chat(conversation_id, errors=None, draft="", status=200):
    """The whole page. `q`, `cursor` and `before` in the query string let the sidebar search, the
    sidebar's "load more" and "load older messages" work as plain links when JavaScript is off.
    `errors`: {slot id: words} for an action that failed without htmx."""
    conversation, messages, older = None, [], None
    if conversation_id is not None:
        conversation, messages, older = service.list_messages(user(), conversation_id, limit=MESSAGE_PAGE,
                                                              before=id_arg("before"))
    query = search_query()
    sidebar, next_cursor = service.list_conversations(user(), limit=SIDEBAR_PAGE, cursor=request.args.get("cursor"),
                                                      query=query or None)
    busy = any(service.is_active(m) for m in messages)
    return render_template("conversation.html", conversation=conversation, messages=messages, older=older,
                           sidebar=sidebar, next_cursor=next_cursor, query=query, models=models_or_none(),
                           default_model=conversation.model if conversation else current_app.config["DEFAULT_MODEL"],
                           errors=errors or {}, draft=draft, busy=busy), status


# ---- fragments ----------------------------------------------------------------------------------

@bp.get("/sidebar")
@login_required
def sidebar():
    """One page of the conversation list (search and infinite scroll both land here)."""
    query = search_query()
    items, next_cursor = service.list_conversations(user(), limit=SIDEBAR_PAGE, cursor=request.args.get("cursor"),
                                                    query=query or None)
    return render_template("_sidebar_page.html", sidebar=items, next_cursor=next_cursor, query=query,
                           current_id=id_arg("current"))


@bp.get("/c/<int:conversation_id>/older")
@login_required
def older_messages(conversation_id):
    before = id_arg("before")
    if not is_htmx():  # a plain link: the page itself, starting further back
        return go_to(url_for("web.conversation", conversation_id=conversation_id, before=before))
    conversation, messages, older = service.list_messages(user(), conversation_id, limit=MESSAGE_PAGE,
                                                          before=before)
    return render_template("_older.html", conversation=conversation, messages=messages, older=older)


@bp.get("/status")
@login_required
def status():
    """The header's model-server indicator (htmx polls it)."""
    try:
        llm_service.health()
        reachable = True
    except LLMError:
        reachable = False
    return render_template("_status.html", reachable=reachable)


# ---- a turn ----------------------------------------------------------------------------------------

@bp.post("/c/new")
@login_required
def new_chat():
    """The first message of a new conversation: a new page (sidebar, header, URL)."""
    turn = service.start_turn(user(), request.form.get("prompt", ""), model=request.form.get("model") or None,
                              request_id=g.request_id)
    return go_to(url_for("web.conversation", conversation_id=turn.conversation_id))


@bp.post("/c/<int:conversation_id>/messages")
@login_required
def send(conversation_id):
    """A message in an existing conversation; the picker's model becomes the conversation's."""
    turn = service.start_turn(user(), request.form.get("prompt", ""), conversation_id,
                              model=request.form.get("model") or None, request_id=g.request_id, keep_model=True)
    if not is_htmx():
        return go_to(url_for("web.conversation", conversation_id=conversation_id))
    return render_template("_turn.html", user_message=turn.user_message, answer=turn.answer,
                           conversation=turn.conversation)


@bp.post("/c/<int:conversation_id>/stop")
@login_required
def stop(conversation_id):
    """Ask the running answer to stop. Its own SSE stream then delivers the "Stopped." bubble."""
    try:
        service.stop(user(), conversation_id)
    except ServiceError as exc:
        if exc.code != "not_generating":
            raise
        if is_htmx():  # it ended by itself meanwhile: say so in its footer
            return retarget(render_template("_error_words.html", message="This answer had already ended."),
                            f"#answer-error-{request.form.get('message_id', '')}")
    if is_htmx():
        return "", 204
    return go_to(url_for("web.conversation", conversation_id=conversation_id))


@bp.post("/c/<int:conversation_id>/regenerate")
@login_required
def regenerate(conversation_id):
    """Answer the last prompt again; with htmx the new (streaming) bubble replaces the old one."""
    turn = service.regenerate(user(), conversation_id, request_id=g.request_id)
    if not is_htmx():
        return go_to(url_for("web.conversation", conversation_id=conversation_id))
    return render_template("_message.html", message=turn.answer, last=True)


@bp.get("/c/<int:conversation_id>/m/<int:message_id>/events")
@login_required
def events(conversation_id, message_id):
    """SSE for one answer: `html` snapshots of the whole text rendered so far, then `done` with the
    final message fragment. Each event's `id:` is the answer's character offset its snapshot rendered.
    A snapshot is always the whole text, so a reconnect (the browser sends `Last-Event-ID` itself)
    starts again with a full snapshot; only a reconnect already at the end of a finished answer gets
    204, so EventSource stops (the page then attaches once afresh for the final fragment)."""
    since = sse.last_event_id()
    message = service.get_message(user(), message_id, conversation_id)
    final, length = not service.is_active(message), len(message.content)
    if sse.at_end(final, length, since):
        service.end_reads()
        return sse.finished()
    return sse.response(answer_frames(message_id, conversation_id, since or 0))


def sidebar_item(conversation_id):
    """The conversation's sidebar entry as it is now ("answering…", message count), or "" if gone."""
    try:
        conversation = service.get_conversation(user(), conversation_id)
        html = render_template("_conversation_item.html", item=conversation, current_id=conversation_id)
    except ServiceError:
        html = ""
    service.end_reads()  # release the connection: the stream may stay open for minutes
    return html


def answer_frames(message_id, conversation_id, since=0):
    """Render the whole answer so far on a token, unless the last render was under RENDER_INTERVAL
    ago (markdown must be re-rendered whole: a later token can close an open code fence). The final
    `done` frame always carries the complete text, so a skipped snapshot is never lost. Ids: the
    offset of the text the page shows (`since` until the first snapshot of a resumed stream)."""
    text, rendered, last_render = "", "", 0.0
    # The sidebar entry says "answering…" now and loses it at the end, without a reload.
    yield sse.event("item", {"html": sidebar_item(conversation_id)}, id=since, retry=sse.RETRY_MS)
    watch = stream_auth.watch()
    for kind, value in service.follow(message_id):
        if not watch.still_allowed():  # this browser's session ended, or the account was disabled
            yield watch.ended()
            return
        if kind == "queued":  # waiting for the model: app.js shows "N ahead of you"
            yield sse.event("queued", {"position": value})
        if kind == "token":
            text += value
        if kind in ("token", "idle") and text != rendered and time.monotonic() - last_render >= RENDER_INTERVAL:
            # On "idle" too: a tail held back by the throttle shows even if the model then pauses.
            yield sse.event("html", {"html": str(render_markdown(text))}, id=len(text))
            rendered, last_render = text, time.monotonic()
        elif kind == "ping":
            yield sse.PING  # lets the server notice a reader that went away
        elif kind == "done":
            html = render_template("_message.html", message=value, last=True)
            yield sse.event("done", {"html": html, "status": value.status, "item": sidebar_item(conversation_id)},
                            id=len(value.content))
            return
    # follow() ends without "done" only if the conversation was deleted meanwhile
    yield sse.event("gone", {"html": ""})


# ---- conversation settings ---------------------------------------------------------------------

@bp.post("/c/<int:conversation_id>/rename")
@login_required
def rename(conversation_id):
    conversation = service.update_conversation(user(), conversation_id, title=request.form.get("title", ""))
    if is_htmx():
        return render_template("_conversation_item.html", item=conversation, current_id=conversation_id)
    return go_to(url_for("web.conversation", conversation_id=conversation_id))


@bp.get("/c/<int:conversation_id>/export")
@login_required
def export(conversation_id):
    return markdown_file(*service.export_markdown(user(), conversation_id))


@bp.post("/c/<int:conversation_id>/delete")
@login_required
def delete(conversation_id):
    service.delete_conversation(user(), conversation_id)
    return go_to(url_for("web.index"))


@bp.post("/c/<int:conversation_id>/settings")
@login_required
def conversation_settings(conversation_id):
    """The per-conversation system prompt (the model is picked in the composer)."""
    service.update_conversation(user(), conversation_id, system_prompt=request.form.get("system_prompt", ""))
    return go_to(url_for("web.conversation", conversation_id=conversation_id))


bp.app_errorhandler(CSRFError)(csrf_failure)
