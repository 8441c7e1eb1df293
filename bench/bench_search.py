"""How long does the sidebar search take for a user with a big history?

Search matches conversation titles and message text (case-insensitive substring, like the search
boxes of the chat UIs people know). This seeds one user with CONVERSATIONS chats of MESSAGES
messages each (~400 characters per message) on a real database and times list_conversations() for
a word that is rare, one that is everywhere, one that is nowhere, and a rare Cyrillic one searched
in another case (on PostgreSQL also without the trigram indexes of migration 0003, for comparison).

    .venv/bin/python bench/bench_search.py [DATABASE_URL] [CONVERSATIONS] [MESSAGES]
"""
import random
import statistics
import sys
import time

from common import bench_user, fresh_app  # noqa: E402  (also puts the project on sys.path)
from sqlalchemy import insert, text  # noqa: E402

from webapp.extensions import db  # noqa: E402
from webapp.models import Conversation, Message  # noqa: E402
from webapp.service import list_conversations  # noqa: E402

WORDS = ("model answer context token stream python database question reply system prompt window "
         "cluster replica worker thread socket").split()


def seed(user, conversations, messages):
    rng = random.Random(7)
    for n in range(conversations):
        conversation = Conversation(user_id=user.id, title=f"chat {n} about {rng.choice(WORDS)}", model="m")
        db.session.add(conversation)
        db.session.flush()
        rows = [{"conversation_id": conversation.id, "role": "user" if m % 2 == 0 else "assistant",
                 "content": " ".join(rng.choice(WORDS) for _ in range(55)), "status": "complete"}
                for m in range(messages)]
        if n % 100 == 0:
            rows[-1]["content"] += " zebra"  # the rare word: in 1% of the chats
        if n % 100 == 50:
            rows[-1]["content"] += " Привет"  # a rare word in another alphabet, searched lower-case
        db.session.execute(insert(Message), rows)
        if n % 200 == 0:
            db.session.commit()
    db.session.commit()
    if db.engine.dialect.name == "postgresql":
        db.session.execute(text("ANALYZE"))
        db.session.commit()


def timed(user, query, runs=20):
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        page, _ = list_conversations(user, limit=30, query=query)
        samples.append((time.perf_counter() - started) * 1000)
        db.session.rollback()
    return len(page), statistics.median(samples), sorted(samples)[int(runs * 0.95)]


def main():
    url = sys.argv[1] if len(sys.argv) > 1 else "sqlite:////tmp/bench-search.db"
    conversations = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    messages = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    with fresh_app(url).app_context():
        user = bench_user()
        started = time.perf_counter()
        seed(user, conversations, messages)
        print(f"seeded {conversations} chats x {messages} messages in {time.perf_counter() - started:.0f} s")
        report(url, user, "")
        if db.engine.dialect.name == "postgresql":  # the same searches without migration 0003's indexes
            db.session.execute(text("DROP INDEX IF EXISTS ix_messages_content_trgm"))
            db.session.execute(text("DROP INDEX IF EXISTS ix_conversations_title_trgm"))
            db.session.commit()
            db.engine._search_trigram_index = None  # search.py checks for the index once per engine
            report(url, user, " (no trigram indexes)")


def report(url, user, label):
    for query in ("zebra", "replica", "unicorn", "привет"):
        found, median, p95 = timed(user, query)
        print(f"{url.split(':')[0]}{label}: q={query!r:<10} {found:>2} shown: median {median:.1f} ms, "
              f"p95 {p95:.1f} ms")


if __name__ == "__main__":
    main()
