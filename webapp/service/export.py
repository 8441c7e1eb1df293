"""A conversation as one Markdown document (the API's export and the pages' download)."""
from sqlalchemy import select

from ..extensions import db
from ..models import COMPLETE, Message, utcnow
from .conversations import free_if_orphaned, get_conversation

EXPORT_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}
EXPORT_ROWS = 1000  # messages read per query: one query for most chats, bounded memory for huge ones


def export_markdown(user, conversation_id):
    """Oldest first; failed or stopped answers say so. Only the columns the text needs, in keyset
    pages of EXPORT_ROWS plain queries (no ORM objects; not a server-side cursor, which costs three
    round trips of its own even for a short chat)."""
    conversation = get_conversation(user, conversation_id)
    free_if_orphaned(conversation)
    parts = [f"# {conversation.title}\n\nModel: {conversation.model} · exported "
             f"{utcnow().strftime('%Y-%m-%d %H:%M UTC')}\n"]
    if conversation.system_prompt:
        parts.append(f"## System prompt\n\n{conversation.system_prompt}\n")
    for role, model, status, error, content in _messages(conversation.id):
        heading = EXPORT_LABELS.get(role, role)
        if role == "assistant" and model:
            heading += f" ({model})"
        note = "" if status == COMPLETE else f"\n\n*[{status}: {error or 'no reason given'}]*"
        parts.append(f"## {heading}\n\n{content}{note}\n")
    return conversation, "\n".join(parts)


def _messages(conversation_id):
    last = 0
    while True:
        rows = db.session.execute(
            select(Message.id, Message.role, Message.model, Message.status, Message.error, Message.content)
            .where(Message.conversation_id == conversation_id, Message.id > last)
            .order_by(Message.id).limit(EXPORT_ROWS)).all()
        for row in rows:
            yield row[1:]
        if len(rows) < EXPORT_ROWS:
            return
        last = rows[-1].id
