"""A conversation as one Markdown document (the API's export and the pages' download)."""
from sqlalchemy import select

from ..extensions import db
from ..models import COMPLETE, Message, utcnow
from .conversations import free_if_orphaned, get_conversation

EXPORT_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}


def export_markdown(user, conversation_id):
    """Oldest first; rows are read 500 at a time (the text itself is one string). Failed or stopped
    answers say so."""
    conversation = get_conversation(user, conversation_id)
    free_if_orphaned(conversation)
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
