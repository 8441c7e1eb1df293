"""The caller's conversations and their messages: find, list (keyset pages, search), create,
change, delete. Every id is looked up through the caller: someone else's id looks like a missing one."""
import base64
from datetime import datetime

from flask import current_app
from sqlalchemy import delete, insert, select

from .. import answers
from ..errors import ServiceError, not_found
from ..extensions import db
from ..generation import generations
from ..limits import MAX_ID
from ..models import SOURCE_API, SOURCE_WEB, Conversation, Message, detached, stored_text, utcnow
from . import search
from .search import search_conditions  # noqa: F401  (the façade exports it)
from .validation import as_id, check_model, clean_system_prompt, clean_title

SOURCES = (SOURCE_WEB, SOURCE_API)  # the doors a conversation can come from


def get_conversation(user, conversation_id):
    conversation = None
    if as_id(conversation_id) is not None:
        conversation = db.session.scalar(select(Conversation).where(
            Conversation.id == int(conversation_id), Conversation.user_id == user.id))
    if conversation is None:
        raise not_found("conversation", "conversation_id")
    return conversation


_INSERT_CONVERSATION = insert(Conversation.__table__).returning(Conversation.__table__.c.id)


def conversation_values(user, title=None, model=None, system_prompt="", source=SOURCE_WEB):
    """A new conversation's columns, as create_conversation (or a turn's one-statement start) writes them."""
    now = utcnow()
    return {"user_id": user.id, "title": stored_text(title or "New chat"), "message_count": 0,
            "model": model or current_app.config["DEFAULT_MODEL"], "system_prompt": stored_text(system_prompt or ""),
            "active_message_id": None, "source": source, "created_at": now, "updated_at": now}


def create_conversation(user, title=None, model=None, system_prompt="", commit=True, source=SOURCE_WEB):
    """One Core INSERT (a turn's first statement after the token check: the ORM's unit of work costs
    more than the statement); returns a copy of the row as written, not tracked by the session."""
    values = conversation_values(user, title, model, system_prompt, source)
    conversation_id = db.session.execute(_INSERT_CONVERSATION, values).scalar_one()
    if commit:
        db.session.commit()
    return detached(Conversation, id=conversation_id, **values)


def update_conversation(user, conversation_id, title=None, model=None, system_prompt=None):
    conversation = get_conversation(user, conversation_id)
    if title is not None:
        conversation.title = clean_title(title)
    if model is not None:
        conversation.model = check_model(model)
    if system_prompt is not None:
        conversation.system_prompt = clean_system_prompt(system_prompt)
    conversation.updated_at = utcnow()
    db.session.commit()
    return conversation


def delete_conversation(user, conversation_id):
    """Delete it with its messages. A running answer is stopped: at once when it runs here, and by
    the generating worker's watchdog elsewhere (it notices its row is gone)."""
    conversation = get_conversation(user, conversation_id)
    active = conversation.active_message_id
    db.session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    db.session.delete(conversation)
    db.session.commit()
    if active:
        generations.abort(active)


def request_stop(message_id):
    answers.request_cancel(message_id)
    generations.abort(message_id)  # at once when it runs here; other workers see the flag


def free_if_orphaned(conversation):
    """Conversations answering right now (rare) are checked for an answer orphaned by a dead worker."""
    if conversation.active_message_id:
        answers.free_if_orphaned(conversation.id, generations.is_live, conversation.active_message_id)


# ---- lists ------------------------------------------------------------------------------------------

def encode_cursor(conversation):
    raw = f"{conversation.updated_at.isoformat()}|{conversation.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor):
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, conversation_id = raw.split("|")
        # Clamped to the ids a 32-bit column can hold: PostgreSQL refuses a bigger (or far negative)
        # number in the comparison with a 500-worthy error, and no row lies beyond either end.
        return datetime.fromisoformat(stamp), max(0, min(int(conversation_id), MAX_ID))
    except (ValueError, UnicodeDecodeError):
        raise ServiceError(400, "invalid_field", "cursor is not valid", "cursor") from None


def list_conversations(user, limit=20, cursor=None, query=None, source=None):
    """Newest first, keyset-paginated on (updated_at, id) so page 500 costs what page 1 does.
    `query`: only those whose title or finished messages contain it (search.py: it stops as soon as
    the page is full). `source`: only those made through that door ("web", or "api" for /v1)."""
    source_filter = None
    if source is not None:
        if source not in SOURCES:
            raise ServiceError(400, "invalid_field", f"source must be one of {', '.join(SOURCES)}", "source")
        source_filter = Conversation.source == source
    after = decode_cursor(cursor) if cursor else None
    if query and query.strip():
        rows = search.search(user.id, query, after, limit + 1, source_filter)
    else:
        stmt = select(Conversation).where(Conversation.user_id == user.id, search.older_than(after))
        if source_filter is not None:
            stmt = stmt.where(source_filter)
        rows = db.session.scalars(stmt.order_by(*search.NEWEST_FIRST).limit(limit + 1)).all()
    page = rows[:limit]
    for conversation in page:
        free_if_orphaned(conversation)
    return page, (encode_cursor(page[-1]) if len(rows) > limit else None)


def list_messages(user, conversation_id, limit=50, before=None):
    """Newest page first (returned oldest-to-newest); `before` is a message id cursor."""
    conversation = get_conversation(user, conversation_id)
    free_if_orphaned(conversation)
    stmt = select(Message).where(Message.conversation_id == conversation.id)
    if before is not None:
        stmt = stmt.where(Message.id < min(before, MAX_ID))
    rows = db.session.scalars(stmt.order_by(Message.id.desc()).limit(limit + 1)).all()
    page = list(reversed(rows[:limit]))
    return conversation, page, (page[0].id if len(rows) > limit else None)


def get_message(user, message_id, conversation_id=None):
    """The caller's message (in that conversation, when one is named), or a 404."""
    message = None
    if as_id(message_id) is not None and (conversation_id is None or as_id(conversation_id) is not None):
        stmt = select(Message).join(Conversation).where(Message.id == int(message_id),
                                                        Conversation.user_id == user.id)
        if conversation_id is not None:
            stmt = stmt.where(Message.conversation_id == conversation_id)
        message = db.session.scalar(stmt)
    if message is None:
        raise not_found("message", "message_id")
    answers.interrupt_if_orphaned(message, generations.is_live)  # a dead worker's: say so, not "streaming"
    return message
