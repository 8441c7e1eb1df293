"""How long does building the model's context take for a short chat and a very long one?

The chat service selects the newest messages with one LIMIT-ed index range scan, so the cost
should not grow with the length of the conversation. This seeds one chat of 10 messages and one
of 10,000 on a real database and times chat.build_context() for each.

    .venv/bin/python bench/bench_context.py [DATABASE_URL]
"""
import statistics
import sys
import time

from common import bench_user, fresh_app  # noqa: E402  (also puts the project on sys.path)
from sqlalchemy import insert, text  # noqa: E402

from webapp.extensions import db  # noqa: E402
from webapp.models import Conversation, Message  # noqa: E402
from webapp.service import build_context  # noqa: E402


def seed(user_id, count):
    conversation = Conversation(user_id=user_id, title=f"{count} messages", model="m", system_prompt="Be brief.")
    db.session.add(conversation)
    db.session.flush()
    rows = [{"conversation_id": conversation.id, "role": "user" if n % 2 == 0 else "assistant",
             "content": f"message number {n} " * 8, "status": "complete"} for n in range(count)]
    for start in range(0, len(rows), 1000):
        db.session.execute(insert(Message), rows[start:start + 1000])
    db.session.commit()
    if db.engine.dialect.name == "postgresql":
        db.session.execute(text("ANALYZE messages"))  # what autovacuum does after a bulk load
        db.session.commit()
    return conversation


def timed(conversation, runs=200):
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        build_context(conversation, 2**31 - 1)
        samples.append((time.perf_counter() - started) * 1000)
        db.session.rollback()
    return statistics.median(samples), sorted(samples)[int(runs * 0.95)]


def main():
    url = sys.argv[1] if len(sys.argv) > 1 else "sqlite:////tmp/bench-context.db"
    with fresh_app(url).app_context():
        user = bench_user()
        for count in (10, 10_000):
            conversation = seed(user.id, count)
            median, p95 = timed(conversation)
            print(f"{url.split(':')[0]:<20} {count:>6} messages: "
                  f"build_context median {median:.2f} ms, p95 {p95:.2f} ms")


if __name__ == "__main__":
    main()
