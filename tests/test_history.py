"""A long conversation read back: the export in keyset pages, and the message pages, on PostgreSQL
and SQLite."""
from datetime import UTC, datetime

from sqlalchemy import insert

from helpers import both_databases

pytestmark = both_databases


def long_chat(user, count):
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    at = datetime(2025, 1, 1, tzinfo=UTC)
    conversation = Conversation(user_id=user.id, title="long", model="m", message_count=count,
                                system_prompt="Be brief.", created_at=at, updated_at=at)
    db.session.add(conversation)
    db.session.flush()
    db.session.execute(insert(Message), [
        {"conversation_id": conversation.id, "role": "user" if n % 2 == 0 else "assistant", "content": f"text {n}",
         "status": "error" if n == 5 else "complete", "error": "model went away" if n == 5 else None,
         "model": None if n % 2 == 0 else "llama", "created_at": at} for n in range(count)])
    db.session.commit()
    return conversation.id


def test_export_reads_every_message_in_order_across_pages(app, alice, monkeypatch):
    from webapp import service
    from webapp.service import export
    conversation_id = long_chat(alice, 11)
    whole = service.export_markdown(alice, conversation_id)[1]
    monkeypatch.setattr(export, "EXPORT_ROWS", 3)  # 11 messages: pages of 3, 3, 3, 2
    assert service.export_markdown(alice, conversation_id)[1] == whole
    assert whole.startswith("# long\n") and "## System prompt\n\nBe brief.\n" in whole
    positions = [whole.index(f"\n\ntext {n}\n" if n != 5 else "\n\ntext 5\n\n*[error: model went away]*")
                 for n in range(11)]
    assert positions == sorted(positions)
    assert "## You\n\ntext 0\n" in whole and "## Assistant (llama)\n\ntext 1\n" in whole
    monkeypatch.setattr(export, "EXPORT_ROWS", 11)  # exactly one full page, then an empty one
    assert service.export_markdown(alice, conversation_id)[1] == whole


def test_message_pages_walk_back_to_the_first(app, alice):
    from webapp import service
    conversation_id = long_chat(alice, 11)
    seen, before = [], None
    while True:
        _, page, before = service.list_messages(alice, conversation_id, limit=4, before=before)
        seen = [m.content for m in page] + seen
        if before is None:
            break
    assert seen == [f"text {n}" for n in range(11)]
