"""The chat service: the single place where a turn happens, shared by the JSON API and the pages.

A turn: save the user's message and a pending assistant message (committed), build the context,
hand generation to a background thread (webapp.generation), and let callers follow it. No database
connection is held while waiting on the LLM; every read and write here is a short transaction.
"""
import base64
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import and_, delete, exists, or_, select, update

from . import llm
from .extensions import db
from .generation import Job, registry_for
from .models import (ACTIVE_STATUSES, COMPLETE, FINAL_STATUSES, INTERRUPTED, PENDING, Conversation,
                     Message, utcnow)

TITLE_LENGTH = 60


class ChatError(Exception):
    """A refusal the views turn into an answer: `status`, a stable `code`, words for people."""

    def __init__(self, status, code, message, field=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass
class Turn:
    """Plain values, safe to use after the session is closed."""
    conversation_id: int
    user_message_id: int | None
    message_id: int
    model: str
    prompt: str | None


# ---- the LLM client, one per app ------------------------------------------------------------------

def client():
    app = current_app._get_current_object()
    if "llm" not in app.extensions:
        app.extensions["llm"] = llm.client_from_config(app.config)
    return app.extensions["llm"]


def list_models():
    """Models from the LLM server, cached briefly (per process) so page loads do not hammer it."""
    extensions = current_app.extensions
    cached = extensions.get("models_cache")
    if cached and time.monotonic() - cached[0] < current_app.config["MODELS_CACHE_SECONDS"]:
        return cached[1]
    models = client().list_models()
    extensions["models_cache"] = (time.monotonic(), models)
    return models


# ---- validation ------------------------------------------------------------------------------------

def clean_prompt(prompt):
    if not isinstance(prompt, str):
        raise ChatError(422, "invalid_field", "prompt must be a string", "prompt")
    if not prompt.strip():
        raise ChatError(422, "invalid_field", "prompt must not be empty", "prompt")
    limit = current_app.config["MAX_PROMPT_CHARS"]
    if len(prompt) > limit:
        raise ChatError(422, "invalid_field", f"prompt is longer than {limit} characters", "prompt")
    return prompt


def clean_text_field(value, name, limit, allow_empty=True):
    if not isinstance(value, str):
        raise ChatError(422, "invalid_field", f"{name} must be a string", name)
    value = value.strip()
    if not value and not allow_empty:
        raise ChatError(422, "invalid_field", f"{name} must not be empty", name)
    if len(value) > limit:
        raise ChatError(422, "invalid_field", f"{name} is longer than {limit} characters", name)
    return value


def title_from(prompt):
    """A title from the first prompt, at once: its first line, cut at a word boundary."""
    line = " ".join(prompt.split())
    if len(line) <= TITLE_LENGTH:
        return line
    cut = line[:TITLE_LENGTH].rsplit(" ", 1)[0] or line[:TITLE_LENGTH]
    return cut + "…"


# ---- conversations ---------------------------------------------------------------------------------

MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns; bigger numbers cannot exist (and PostgreSQL rejects them)


def _as_id(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 < value <= MAX_ID else None


def get_conversation(user, conversation_id):
    """The caller's conversation or a 404: someone else's id looks exactly like a missing one."""
    conversation = None
    if _as_id(conversation_id) is not None:
        conversation = db.session.scalar(select(Conversation).where(
            Conversation.id == int(conversation_id), Conversation.user_id == user.id))
    if conversation is None:
        raise ChatError(404, "not_found", "conversation not found", "conversation_id")
    return conversation


def create_conversation(user, title=None, model=None, system_prompt=""):
    conversation = Conversation(user_id=user.id, title=title or "New chat",
                                model=model or current_app.config["DEFAULT_MODEL"],
                                system_prompt=system_prompt or "")
    db.session.add(conversation)
    db.session.commit()
    return conversation


def update_conversation(user, conversation_id, title=None, model=None, system_prompt=None):
    conversation = get_conversation(user, conversation_id)
    if title is not None:
        conversation.title = clean_text_field(title, "title", 200, allow_empty=False)
    if model is not None:
        conversation.model = clean_text_field(model, "model", 200, allow_empty=False)
    if system_prompt is not None:
        conversation.system_prompt = clean_text_field(system_prompt, "system_prompt", 8000)
    conversation.updated_at = utcnow()
    db.session.commit()
    return conversation


def delete_conversation(user, conversation_id):
    conversation = get_conversation(user, conversation_id)
    if conversation.active_message_id:
        # Stop the generation first so its thread does not write into a deleted row.
        request_stop(conversation.active_message_id)
    db.session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    db.session.delete(conversation)
    db.session.commit()


def encode_cursor(conversation):
    raw = f"{conversation.updated_at.isoformat()}|{conversation.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor):
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, conversation_id = raw.split("|")
        return datetime.fromisoformat(stamp), int(conversation_id)
    except (ValueError, UnicodeDecodeError):
        raise ChatError(400, "invalid_field", "cursor is not valid", "cursor") from None


def list_conversations(user, limit=20, cursor=None, query=None):
    """Newest first, keyset-paginated on (updated_at, id) so page 500 costs what page 1 does."""
    stmt = conversations_query(user.id, cursor, query)
    rows = db.session.scalars(stmt.limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]) if len(rows) > limit else None
    for conversation in page:
        if conversation.active_message_id:  # rare: only chats answering right now, or orphaned by a crash
            reap_if_stale(conversation)
    return page, next_cursor


def conversations_query(user_id, cursor=None, query=None):
    stmt = select(Conversation).where(Conversation.user_id == user_id)
    if cursor:
        stamp, last_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Conversation.updated_at < stamp,
                              and_(Conversation.updated_at == stamp, Conversation.id < last_id)))
    if query:
        title_matches, message_matches = search_conditions(query)
        stmt = stmt.where(or_(title_matches, exists().where(Message.conversation_id == Conversation.id,
                                                            *message_matches)))
    return stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc())


def search_conditions(query):
    """Case-insensitive substring match on titles and on finished messages. Finished only: that is
    what PostgreSQL's partial trigram index holds (migration 0003); a streaming answer is found once
    it ends."""
    pattern = f"%{_escape_like(query.strip())}%"
    return (Conversation.title.ilike(pattern, escape="\\"),
            (Message.status.in_(FINAL_STATUSES), Message.content.ilike(pattern, escape="\\")))


def _escape_like(text):
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_messages(user, conversation_id, limit=50, before=None):
    """Newest page first (returned oldest-to-newest); `before` is a message id cursor."""
    conversation = get_conversation(user, conversation_id)
    reap_if_stale(conversation)
    stmt = select(Message).where(Message.conversation_id == conversation.id)
    if before is not None:
        stmt = stmt.where(Message.id < min(before, MAX_ID))
    rows = db.session.scalars(stmt.order_by(Message.id.desc()).limit(limit + 1)).all()
    page = list(reversed(rows[:limit]))
    older = page[0].id if len(rows) > limit else None
    return conversation, page, older


def get_message(user, message_id):
    message = None
    if _as_id(message_id) is not None:
        message = db.session.scalar(select(Message).join(Conversation).where(
            Message.id == int(message_id), Conversation.user_id == user.id))
    if message is None:
        raise ChatError(404, "not_found", "message not found", "message_id")
    if reap_message_if_stale(message):  # orphaned by a dead worker: say so, not "streaming"
        db.session.refresh(message)
    return message


# ---- a turn ----------------------------------------------------------------------------------------

def start_turn(user, prompt, conversation_id=None, model=None, request_id=None, options=None):
    """Save the prompt, claim the conversation, start generating. Returns the Turn at once."""
    prompt = clean_prompt(prompt)
    if model is not None:
        model = clean_text_field(model, "model", 200, allow_empty=False)
    if conversation_id is None:
        conversation = create_conversation(user, title=title_from(prompt), model=model)
    else:
        conversation = get_conversation(user, conversation_id)
    model = model or conversation.model
    _claim(conversation)
    user_message = Message(conversation_id=conversation.id, role="user", content=prompt, status=COMPLETE,
                           request_id=request_id)
    return _begin_answer(conversation, model, request_id, options, user_message)


def regenerate(user, conversation_id, model=None, request_id=None, options=None):
    """Run the last turn again. The last answer (failed, stopped or fine) is replaced by the new one."""
    conversation = get_conversation(user, conversation_id)
    model = clean_text_field(model, "model", 200, allow_empty=False) if model else conversation.model
    _claim(conversation)
    last = db.session.scalar(select(Message).where(Message.conversation_id == conversation.id)
                             .order_by(Message.id.desc()).limit(1))
    if last is None:
        _release(conversation)
        raise ChatError(409, "nothing_to_regenerate", "this conversation has no message to answer again")
    if last.role == "assistant":
        db.session.delete(last)
        conversation.message_count -= 1
    return _begin_answer(conversation, model, request_id, options, None)


def _claim(conversation):
    """One turn at a time per conversation: an atomic compare-and-set on active_message_id."""
    conversation_id = conversation.id
    for attempt in range(2):
        claimed = db.session.execute(update(Conversation).where(
            Conversation.id == conversation_id, Conversation.active_message_id.is_(None))
            .values(active_message_id=0)).rowcount
        if claimed:
            return
        db.session.rollback()
        if db.session.scalar(select(Conversation.id).where(Conversation.id == conversation_id)) is None:
            raise ChatError(404, "not_found", "conversation not found", "conversation_id")  # deleted meanwhile
        if attempt == 0 and not reap_if_stale(conversation):
            break
    raise ChatError(409, "conversation_busy", "an answer is already being generated in this conversation; "
                                              "wait for it or stop it first")


def _release(conversation):
    db.session.rollback()
    db.session.execute(update(Conversation).where(Conversation.id == conversation.id,
                                                  Conversation.active_message_id == 0)
                       .values(active_message_id=None))
    db.session.commit()


def _begin_answer(conversation, model, request_id, options, user_message):
    now = utcnow()
    if user_message is not None:
        db.session.add(user_message)
        conversation.message_count += 1
    answer = Message(conversation_id=conversation.id, role="assistant", content="", status=PENDING,
                     model=model, request_id=request_id, heartbeat_at=now)
    db.session.add(answer)
    conversation.message_count += 1
    conversation.updated_at = now
    db.session.flush()
    conversation.active_message_id = answer.id
    # Plain values only from here: once committed, the rows may be deleted by another request.
    turn = Turn(conversation.id, user_message.id if user_message else None, answer.id, model,
                user_message.content if user_message else None)
    job = Job(message_id=answer.id, conversation_id=conversation.id, model=model,
              messages=build_context(conversation, answer.id), options=options or {}, request_id=request_id)
    db.session.commit()  # the prompt is safe before the LLM is called, and no connection is held after
    registry_for(current_app._get_current_object()).launch(job, client())
    return turn


def build_context(conversation, answer_id):
    """System prompt + newest messages within the budget. Costs the same for 10 or 10,000 messages:
    one index range scan backwards from the answer, LIMIT-ed. Failed and stopped answers are left out."""
    config = current_app.config
    rows = db.session.execute(
        select(Message.role, Message.content).where(
            Message.conversation_id == conversation.id, Message.id < answer_id,
            or_(Message.role == "user", and_(Message.role == "assistant", Message.status == COMPLETE)))
        .order_by(Message.id.desc()).limit(config["CONTEXT_MAX_MESSAGES"])).all()
    budget = config["CONTEXT_MAX_CHARS"] - len(conversation.system_prompt or "")
    kept = []
    for role, content in rows:
        if kept and len(content) > budget:
            break
        kept.append({"role": role, "content": content})
        budget -= len(content)
    kept.reverse()
    if conversation.system_prompt:
        kept.insert(0, {"role": "system", "content": conversation.system_prompt})
    return kept


# ---- following, stopping, and dead workers ---------------------------------------------------------

def follow(message_id, poll=0.3, keepalive=10.0):
    """Yield ("token", text) as the answer grows, then ("done", Message) once it is final.

    Replays from the start, so a client that re-attaches gets the whole answer. Tokens come from
    this process's live generation when it is here, else from the row the generating worker
    flushes (so it works from any worker or replica). ("idle", None) comes after each quiet poll
    (a tick for throttled renderers), and ("ping", None) every `keepalive` seconds of silence, to
    let the caller notice a client that went away.
    """
    registry = registry_for(current_app._get_current_object())
    sent, idle_since = 0, time.monotonic()
    while True:
        live = registry.get(message_id)
        if live is not None:
            live.wait(sent, timeout=poll)
            text, finished = live.text, False  # the final state is read from the row below
        else:
            message = _fresh_message(message_id)
            if message is None:
                return
            reap_message_if_stale(message)
            text, finished = message.content, message.status in FINAL_STATUSES
        if len(text) > sent:
            yield "token", text[sent:]
            sent, idle_since = len(text), time.monotonic()
        elif not finished:
            yield "idle", None
        if finished:
            yield "done", _fresh_message(message_id)
            return
        if live is None:
            time.sleep(poll)
        if time.monotonic() - idle_since >= keepalive:
            idle_since = time.monotonic()
            yield "ping", None


def wait_final(message_id, timeout=None):
    """Block until the message is final (or the timeout): the non-streaming API's way to answer."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for kind, value in follow(message_id):
        if kind == "done":
            return value
        if deadline is not None and time.monotonic() > deadline:
            return _fresh_message(message_id)
    return _fresh_message(message_id)


def _fresh_message(message_id):
    """Read the row anew and release the connection at once (followers may wait for minutes)."""
    db.session.expire_all()
    message = db.session.get(Message, message_id)
    if message is not None:
        db.session.expunge(message)
    db.session.rollback()  # ends the transaction: the connection goes back to the pool
    return message


def stop(user, conversation_id):
    """Stop the running answer from any worker: this process aborts at once; others notice the flag."""
    conversation = get_conversation(user, conversation_id)
    message_id = conversation.active_message_id
    if not message_id:
        raise ChatError(409, "not_generating", "nothing is being generated in this conversation")
    request_stop(message_id)
    return wait_final(message_id, timeout=5.0)


def request_stop(message_id):
    db.session.execute(update(Message).where(Message.id == message_id).values(cancel_requested=True))
    db.session.commit()
    registry_for(current_app._get_current_object()).abort(message_id)


# ---- export ----------------------------------------------------------------------------------------

EXPORT_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}


def export_markdown(user, conversation_id):
    """The whole conversation as a Markdown document, oldest first; rows are read 500 at a time (the
    text itself is one string). Failed or stopped answers say so."""
    conversation = get_conversation(user, conversation_id)
    reap_if_stale(conversation)
    parts = [f"# {conversation.title}\n\nModel: {conversation.model} · exported "
             f"{utcnow().strftime('%Y-%m-%d %H:%M UTC')}\n"]
    if conversation.system_prompt:
        parts.append(f"## System prompt\n\n{conversation.system_prompt}\n")
    messages = db.session.scalars(select(Message).where(Message.conversation_id == conversation.id)
                                  .order_by(Message.id).execution_options(yield_per=500))
    for message in messages:
        heading = EXPORT_LABELS.get(message.role, message.role)
        if message.role == "assistant" and message.model:
            heading += f" ({message.model})"
        note = "" if message.status == COMPLETE else f"\n\n*[{message.status}: {message.error or 'no reason given'}]*"
        parts.append(f"## {heading}\n\n{message.content}{note}\n")
    return conversation, "\n".join(parts)


def reap_stale(batch=100):
    """Sweep for answers orphaned by a dead worker anywhere and save them as interrupted, so the
    database tells the truth even before anyone looks (each read also checks; see reap_if_stale).
    A cheap query: the partial index ix_messages_active holds only pending/streaming rows."""
    cutoff = utcnow() - timedelta(seconds=current_app.config["STALE_AFTER_SECONDS"])
    orphans = db.session.scalars(select(Message).where(
        Message.status.in_(ACTIVE_STATUSES), Message.heartbeat_at <= cutoff).limit(batch)).all()
    return sum(reap_message_if_stale(message) for message in orphans)


def reap_if_stale(conversation):
    """If the conversation's running answer belongs to a dead worker, mark it interrupted."""
    if not conversation.active_message_id:
        return False
    message = db.session.get(Message, conversation.active_message_id)
    if message is None:
        db.session.execute(update(Conversation).where(Conversation.id == conversation.id)
                           .values(active_message_id=None))
        db.session.commit()
        return True
    return reap_message_if_stale(message)


def reap_message_if_stale(message):
    """A message still 'streaming' whose heartbeat stopped was orphaned by a crash or restart: save it
    as interrupted with its partial text, and free its conversation for a retry."""
    if message.status not in ACTIVE_STATUSES:
        return False
    if registry_for(current_app._get_current_object()).get(message.id) is not None:
        return False
    limit = utcnow() - timedelta(seconds=current_app.config["STALE_AFTER_SECONDS"])
    if message.heartbeat_at is not None and message.heartbeat_at > limit:
        return False
    changed = db.session.execute(update(Message).where(
        Message.id == message.id, Message.status.in_(ACTIVE_STATUSES),
        or_(Message.heartbeat_at.is_(None), Message.heartbeat_at <= limit)).values(
        status=INTERRUPTED, error_code="interrupted", finished_at=utcnow(),
        error="the server stopped while generating this answer; retry to generate it again")).rowcount
    db.session.execute(update(Conversation).where(Conversation.id == message.conversation_id,
                                                  Conversation.active_message_id == message.id)
                       .values(active_message_id=None))
    db.session.commit()
    return bool(changed)
