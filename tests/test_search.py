"""The sidebar search (webapp/service/search.py): newest first, keyset pages, case-insensitive in
every alphabet, and it stops when the page is full instead of reading every match — on PostgreSQL
and SQLite, through the walk, the trigram probe, and the walk that takes over from a full probe."""
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, text

from helpers import both_databases, make_user

pytestmark = both_databases

BASE = datetime(2025, 1, 1, tzinfo=UTC)


def seed(user, chats, word_in=lambda n: False, per_chat=4, title=lambda n: f"chat {n}", stamp=None,
         status="complete"):
    """`chats` conversations; chat n has `per_chat` messages and says "Replica" in its middle one
    when word_in(n). Returns their ids."""
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    ids = []
    for n in range(chats):
        at = stamp(n) if stamp else BASE + timedelta(minutes=n)
        conversation = Conversation(user_id=user.id, title=title(n), model="m", message_count=per_chat,
                                    created_at=at, updated_at=at)
        db.session.add(conversation)
        db.session.flush()
        ids.append(conversation.id)
        db.session.execute(insert(Message), [
            {"conversation_id": conversation.id, "role": "user" if m % 2 == 0 else "assistant",
             "content": f"message {m} of chat {n}" + (" about a Replica set" if word_in(n) and m == per_chat // 2
                                                       else ""), "status": status, "created_at": at}
            for m in range(per_chat)])
    db.session.commit()
    if db.engine.dialect.name == "postgresql":  # statistics as a live database has them
        db.session.execute(text("ANALYZE conversations, messages"))
        db.session.commit()
    return ids


def expected(user, predicate):
    """Every conversation of the user that `predicate` accepts, newest first (the order searched)."""
    from webapp.extensions import db
    from webapp.models import Conversation
    chats = db.session.scalars(select(Conversation).where(Conversation.user_id == user.id)
                               .order_by(Conversation.updated_at.desc(), Conversation.id.desc())).all()
    return [c.id for c in chats if predicate(c)]


def all_pages(user, query, limit, **kwargs):
    from webapp import service
    found, cursor = [], None
    while True:
        page, cursor = service.list_conversations(user, limit=limit, cursor=cursor, query=query, **kwargs)
        found.append([c.id for c in page])
        if cursor is None:
            return found


SIZES = {  # (WALK_MESSAGES, WALK_CHATS, PROBE_ROWS): every path of the search
    "defaults": None,
    "small walks, probe": (6, 3, 1000),
    "probe overflows, walk on": (6, 3, 2),
}


@pytest.fixture(params=list(SIZES))
def sizes(request, monkeypatch):
    from webapp.service import search
    if SIZES[request.param]:
        for name, value in zip(("WALK_MESSAGES", "WALK_CHATS", "PROBE_ROWS"), SIZES[request.param], strict=True):
            monkeypatch.setattr(search, name, value)
    return request.param


def test_newest_first_with_ties_and_cursor_pages(app, alice, sizes):
    # 60 chats, stamps shared by threes (ties broken by id), the word in every 4th chat and in the
    # title of chat 13; chat 7 gets a recent turn, so it is the newest although its id is small.
    ids = seed(alice, 60, word_in=lambda n: n % 4 == 0, title=lambda n: "replica notes" if n == 13 else f"chat {n}",
               stamp=lambda n: BASE + timedelta(minutes=n // 3))
    from webapp.extensions import db
    from webapp.models import Conversation
    db.session.get(Conversation, ids[7]).updated_at = BASE + timedelta(days=1)
    db.session.commit()
    matching = {ids[n] for n in range(60) if n % 4 == 0} | {ids[13]}
    want = expected(alice, lambda c: c.id in matching)
    assert len(want) == 16
    pages = all_pages(alice, "replica", limit=5)
    assert [len(p) for p in pages] == [5, 5, 5, 1]
    assert [i for p in pages for i in p] == want
    assert all_pages(alice, "replica", limit=16) == [want]  # exactly one full page: no empty page after it
    assert all_pages(alice, "REPLICA", limit=100) == [want]


def test_a_word_in_every_chat_and_in_none(app, alice, sizes):
    seed(alice, 40, word_in=lambda n: True)
    every = expected(alice, lambda c: True)
    assert all_pages(alice, "replica", limit=30) == [every[:30], every[30:]]
    assert all_pages(alice, "unicorn", limit=30) == [[]]


def test_case_insensitive_in_every_alphabet_and_literal_wildcards(app, alice):
    from webapp import service
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    texts = {"ru": "Ну привет, мир", "ru-title": None, "fr": "L'ÉTÉ à Paris", "pct": "a 100% hydration dough",
             "under": "snake_case names", "pending": "привет из ответа, который ещё пишется"}
    ids = {}
    for n, (name, content) in enumerate(texts.items()):
        at = BASE + timedelta(minutes=n)
        conversation = Conversation(user_id=alice.id, title="ПРИВЕТСТВИЕ" if name == "ru-title" else name,
                                    model="m", message_count=1, created_at=at, updated_at=at)
        db.session.add(conversation)
        db.session.flush()
        ids[name] = conversation.id
        if content:
            db.session.add(Message(conversation_id=conversation.id, role="user", content=content,
                                   status="streaming" if name == "pending" else "complete", created_at=at))
    db.session.commit()

    def found(query):
        return [c.id for c in service.list_conversations(alice, limit=30, query=query)[0]]
    # Russian-speaking users: "Привет" finds "привет", and a capitalised title; an answer still
    # being written is found once it ends (the index holds finished messages only).
    assert found("Привет") == [ids["ru-title"], ids["ru"]]
    assert found("ПРИВЕТ, МИР") == [ids["ru"]]
    assert found("été") == [ids["fr"]] and found("PARIS") == [ids["fr"]]
    assert found("100%") == [ids["pct"]] and found("0%h") == []
    assert found("e_c") == [ids["under"]] and found("_") == [ids["under"]]
    assert found("  paris  ") == [ids["fr"]]
    assert found("a\x00b") == []  # stored text never holds NUL (it becomes U+FFFD): no match, no error


def test_search_keeps_the_source_filter(app, alice):
    from webapp import service
    from webapp.extensions import db
    from webapp.models import Conversation
    ids = seed(alice, 6, word_in=lambda n: True)
    for n in (1, 4):
        db.session.get(Conversation, ids[n]).source = "api"
    db.session.commit()
    page, _ = service.list_conversations(alice, limit=10, query="replica", source="api")
    assert [c.id for c in page] == [ids[4], ids[1]]


def test_someone_elses_matches_are_not_found(app, alice):
    from webapp import service
    from webapp.extensions import db
    from webapp.models import User
    mallory = make_user(app, "mallory")
    mallory = db.session.scalar(select(User).where(User.username == "mallory"))
    seed(mallory, 5, word_in=lambda n: True)
    mine = seed(alice, 5, word_in=lambda n: n == 2)
    assert [c.id for c in service.list_conversations(alice, limit=30, query="replica")[0]] == [mine[2]]


def test_a_common_word_reads_only_the_newest_chats(app, alice):
    """A word in every one of 300 chats (3,000 matching messages): the first page reads a few dozen
    messages, not every match. The old query let PostgreSQL's planner collect (hash) every matching
    message first; on SQLite it walked, so there the count is of the Unicode folds of a Cyrillic word."""
    from webapp import service
    from webapp.extensions import db
    seed(alice, 300, word_in=lambda n: True, per_chat=10)
    connection = db.session.connection()
    if db.engine.dialect.name == "postgresql":
        page, cursor = service.list_conversations(alice, limit=30, query="replica")
        read = connection.execute(text(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
            "WHERE relname = 'messages'")).scalar()
    else:
        folds = []
        connection.connection.dbapi_connection.create_function(
            "unicode_lower", 1, lambda value: folds.append(1) or value.lower(), deterministic=True)
        db.session.execute(text("UPDATE messages SET content = replace(content, 'Replica', 'Реплика')"))
        page, cursor = service.list_conversations(alice, limit=30, query="реплика")
        read = len(folds)
    assert len(page) == 30 and cursor is not None
    assert read < 600, f"{read} messages read for one page"  # 3,000 match; the walk needs ~31 chats


def test_postgresql_plans_walk_by_chat_and_probe_by_trigram(app, alice, database_url):
    """The plan shapes the search relies on, with the statistics of a rare word (where PostgreSQL
    would gladly run the trigram index once per chat, which costs a common word every match each
    time): the walk reads each chat by (conversation_id, id), the probe uses the trigram index."""
    if not database_url.startswith("postgresql"):
        pytest.skip("plans are PostgreSQL's")
    from sqlalchemy import event

    from webapp import service
    from webapp.extensions import db
    seed(alice, 200, word_in=lambda n: n == 3, per_chat=10)
    statements = []

    def note(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))
    event.listen(db.engine, "before_cursor_execute", note)
    try:
        page, _ = service.list_conversations(alice, limit=30, query="replica")
        plans = {}
        raw = db.session.connection().connection.dbapi_connection.cursor()
        for statement, parameters in statements:
            if "set_config" in statement:
                raw.execute(statement, parameters)  # the probe's settings, as the search had them
            elif "OVER (" in statement or statement.lstrip().startswith("SELECT messages.conversation_id"):
                raw.execute("EXPLAIN " + statement, parameters)
                plans["walk" if "OVER (" in statement else "probe"] = "\n".join(r[0] for r in raw.fetchall())
    finally:
        event.remove(db.engine, "before_cursor_execute", note)
    assert len(page) == 1
    assert "ix_messages_conversation_id_id" in plans["walk"] and "trgm" not in plans["walk"], plans["walk"]
    assert "Bitmap Index Scan on ix_messages_content_trgm" in plans["probe"], plans["probe"]
    assert "Index Cond: (content ~~* " in plans["probe"] and "Seq Scan" not in plans["probe"], plans["probe"]
