"""webapp/answers.py directly: the busy flag and final statuses have one writer, and it is safe."""
from datetime import timedelta

import pytest
from sqlalchemy import select

from helpers import both_databases, make_user

pytestmark = both_databases


@pytest.fixture
def conversation(app):
    make_user(app)
    with app.test_request_context():
        from webapp.extensions import db
        from webapp.models import Conversation
        row = Conversation(user_id=1, title="t", model="tinyllama", system_prompt="", message_count=0)
        db.session.add(row)
        db.session.commit()
        yield row


def _answers_in_new_conversations(conversation, more):
    """An answer opened in `conversation` and in `more` new ones: [(answer id, conversation id)]."""
    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation
    rows = [Conversation(user_id=1, title=f"t{i}", model="tinyllama", system_prompt="", message_count=0)
            for i in range(more)]
    db.session.add_all(rows)
    db.session.commit()
    opened = []
    for row in [conversation, *rows]:
        _, answer = answers.open_answer(reload(Conversation, row.id), "tinyllama", None, prompt="hi")
        db.session.commit()
        opened.append((answer.id, row.id))
    return opened


def reload(model, row_id):
    from webapp.extensions import db
    db.session.expire_all()
    return db.session.get(model, row_id)


def test_open_claims_and_finish_releases(app, conversation):
    from webapp import answers
    from webapp.errors import ServiceError
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    prompt, answer = answers.open_answer(conversation, "tinyllama", "r1", prompt="hello")
    db.session.commit()
    assert reload(Conversation, conversation.id).active_message_id == answer.id
    assert reload(Conversation, conversation.id).message_count == 2
    conversation = reload(Conversation, conversation.id)
    with pytest.raises(ServiceError) as busy:
        answers.open_answer(conversation, "tinyllama", "r2", prompt="again")
    assert busy.value.code == "conversation_busy"
    assert db.session.scalars(select(Message.content)).all() == ["hello", ""]  # nothing half-written
    answers.flush({answer.id: "partial"})
    assert reload(Message, answer.id).status == "streaming"
    assert answers.finish(answer.id, conversation.id, "complete", "partial text", usage={"completion_tokens": 2})
    message = reload(Message, answer.id)
    assert (message.status, message.content, message.completion_tokens) == ("complete", "partial text", 2)
    assert reload(Conversation, conversation.id).active_message_id is None
    answers.flush({answer.id: "late"})  # a flush after the end changes nothing
    assert reload(Message, answer.id).content == "partial text"


def test_an_orphan_is_interrupted_and_frees_its_conversation(app, conversation):
    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message, utcnow
    _, answer = answers.open_answer(conversation, "tinyllama", None, prompt="hello")
    db.session.commit()
    answers.flush({answer.id: "half"})
    assert answers.sweep_orphans(lambda _id: False) == 0  # heartbeat is fresh
    message = reload(Message, answer.id)
    message.heartbeat_at = utcnow() - timedelta(minutes=5)
    db.session.commit()
    assert answers.sweep_orphans(lambda _id: True) == 0  # live in this process: not an orphan
    assert answers.sweep_orphans(lambda _id: False) == 1
    message = reload(Message, answer.id)
    assert (message.status, message.content, message.error) == ("interrupted", "half", answers.INTERRUPTED_MESSAGE)
    assert reload(Conversation, conversation.id).active_message_id is None
    # The conversation takes a new turn at once.
    _, again = answers.open_answer(reload(Conversation, conversation.id), "tinyllama", None, prompt="retry")
    db.session.commit()
    assert reload(Conversation, conversation.id).active_message_id == again.id


def test_a_claim_over_a_dead_workers_answer_succeeds(app, conversation):
    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message, utcnow
    _, stuck = answers.open_answer(conversation, "tinyllama", None, prompt="hello")
    db.session.commit()
    reload(Message, stuck.id).heartbeat_at = utcnow() - timedelta(minutes=5)
    db.session.commit()
    _, answer = answers.open_answer(reload(Conversation, conversation.id), "tinyllama", None, prompt="again")
    db.session.commit()
    assert reload(Message, stuck.id).status == "interrupted"
    assert reload(Conversation, conversation.id).active_message_id == answer.id


def test_earlier_messages_are_written_by_the_attempt_that_claims(app, conversation):
    """`earlier` rows go in with the prompt in each attempt: the first attempt's rollback (the claim
    failed on a dead worker's answer) does not lose them, and the count includes them."""
    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message, utcnow
    _, stuck = answers.open_answer(conversation, "tinyllama", None, prompt="hello")
    db.session.commit()
    reload(Message, stuck.id).heartbeat_at = utcnow() - timedelta(minutes=5)
    db.session.commit()
    prompt, answer = answers.open_answer(reload(Conversation, conversation.id), "tinyllama", None, prompt="E",
                                         earlier=[("user", "C"), ("assistant", "D")])
    db.session.commit()
    assert (prompt.role, prompt.content) == ("user", "E")
    rows = db.session.execute(select(Message.id, Message.role, Message.content, Message.status)
                              .order_by(Message.id)).all()
    assert [(role, content, status) for _, role, content, status in rows[2:]] == [
        ("user", "C", "complete"), ("assistant", "D", "complete"), ("user", "E", "complete"),
        ("assistant", "", "pending")]
    assert [rows[-2].id, rows[-1].id] == [prompt.id, answer.id]
    assert reload(Conversation, conversation.id).message_count == len(rows) == 6


def test_stop_requests_and_deleted_answers_are_both_cancelled(app, conversation):
    from webapp import answers
    from webapp.extensions import db
    _, answer = answers.open_answer(conversation, "tinyllama", None, prompt="hello")
    db.session.commit()
    assert answers.cancel_requested([answer.id]) == []
    answers.request_cancel(answer.id)
    assert answers.cancel_requested([answer.id, 999_999]) == [answer.id, 999_999]  # the missing one was deleted


def test_the_watchdogs_statements_over_many_answers_do_not_grow_with_them(app, conversation):
    """Stop flags and heartbeats are read and written for all of a worker's answers every tick: with
    500 answers, the same statement as with 2 (one array on PostgreSQL, not a parameter per id)."""
    from sqlalchemy import event

    from webapp import answers
    from webapp.extensions import db
    _, answer = answers.open_answer(conversation, "tinyllama", None, prompt="hello")
    db.session.commit()
    answers.request_cancel(answer.id)
    statements = []

    def record(connection, cursor, statement, *args):
        statements.append(statement)
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        many = [answer.id, *range(10_000_000, 10_000_499)]
        assert answers.cancel_requested(many) == many  # flagged, and the rest deleted (missing)
        assert answers.cancel_requested([answer.id, 10_000_000]) == [answer.id, 10_000_000]
        answers.beat(many)
        answers.beat([answer.id])
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    if db.engine.dialect.name == "postgresql":
        assert statements[0] == statements[1] and statements[2] == statements[3] and len(statements[0]) < 1000
    else:
        assert len(statements[0]) > len(statements[1])  # SQLite: a plain IN list


def test_a_heartbeat_skips_rows_another_transaction_holds_instead_of_waiting(app, conversation, database_url):
    """The watchdog's heartbeat must not wait on a row a flush or a batch of final saves holds: they
    lock rows in id order and the heartbeat's UPDATE ... IN in table order, and waiting deadlocked
    (PostgreSQL killed the heartbeat with 150 answers ending together). It beats the rows it can."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: no row locks to skip")
    import psycopg

    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message, utcnow
    other = Conversation(user_id=1, title="other", model="tinyllama", system_prompt="", message_count=0)
    db.session.add(other)
    db.session.commit()
    opened = []
    for row in (conversation, other):
        _, answer = answers.open_answer(reload(Conversation, row.id), "tinyllama", None, prompt="hi")
        db.session.commit()
        opened.append(answer.id)
    held, free = opened
    old = utcnow() - timedelta(minutes=5)
    db.session.execute(Message.__table__.update().values(heartbeat_at=old))
    db.session.commit()
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as holder:   # another transaction holds one answer's row
        holder.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (held,))
        db.session.connection().exec_driver_sql("SET LOCAL statement_timeout = '2s'")  # a wait fails
        answers.beat([held, free])
    beaten = {message_id: reload(Message, message_id).heartbeat_at for message_id in opened}
    assert beaten[free] > old and beaten[held] == old, beaten


def test_finish_many_saves_answers_ending_together_in_one_transaction(app, conversation):
    """The group commit of answers ending together (generation._Finisher): every answer saved with
    its own outcome and its conversation freed; an answer whose row is gone reports 0."""
    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    opened = _answers_in_new_conversations(conversation, 2)
    gone_id, gone_conversation = opened[2]
    db.session.delete(reload(Message, gone_id))
    db.session.commit()
    usage = {"done_reason": "stop", "completion_tokens": 3}
    saved = answers.finish_many([
        (opened[0][0], opened[0][1], "complete", "first", None, None, usage),
        (opened[1][0], opened[1][1], "error", "sec\x00ond", "upstream_error", "it broke",
         {**usage, "done_reason": None}),
        (gone_id, gone_conversation, "complete", "lost", None, None, usage)])
    assert saved == {opened[0][0], opened[1][0]}  # not the one whose row was gone
    first, second = reload(Message, opened[0][0]), reload(Message, opened[1][0])
    assert (first.status, first.content, first.completion_tokens, first.done_reason) == ("complete", "first", 3, "stop")
    assert (second.status, second.content, second.error_code, second.error) == (
        "error", "sec\ufffdond", "upstream_error", "it broke")
    assert [reload(Conversation, c).active_message_id for _, c in opened[:2]] == [None, None]


def test_many_answers_are_flushed_and_ended_together_in_one_statement_each(app, conversation):
    """The watchdog's flush and a batch of final saves over many answers: each answer's own text and
    outcome, a final answer left alone by a late flush; on PostgreSQL one statement each, whatever
    the count (arrays, not executemany). Run twice: a statement seen again is sent by psycopg itself."""
    from sqlalchemy import event

    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    opened = _answers_in_new_conversations(conversation, 5)
    statements = []

    def record(connection, cursor, statement, *args):
        statements.append(statement)
    for round_ in range(2):
        answers.flush({message_id: f"r{round_} m{message_id}\x00" for message_id, _ in opened})
        assert {reload(Message, m).content for m, _ in opened} == {f"r{round_} m{m}\ufffd" for m, _ in opened}
    assert {reload(Message, m).status for m, _ in opened} == {"streaming"}
    usage = {"done_reason": "stop", "completion_tokens": 4}
    for batch in (opened[:2], opened[2:4]):  # SQLAlchemy's first run, then psycopg's
        assert answers.finish_many([(m, c, "complete", f"end {m}", None, None, usage) for m, c in batch]) == {
            m for m, _ in batch}
    second = opened[4:]
    event.listen(db.engine, "before_cursor_execute", record)  # (listened to: through SQLAlchemy again)
    try:
        saved = answers.finish_many([(m, c, "complete", f"end {m}", None, None, usage) for m, c in second])
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert saved == {m for m, _ in second}
    answers.flush({message_id: "late" for message_id, _ in opened})  # after the end: changes nothing
    for message_id, conversation_id in opened:
        message = reload(Message, message_id)
        assert (message.status, message.content, message.completion_tokens) == ("complete", f"end {message_id}", 4)
        assert reload(Conversation, conversation_id).active_message_id is None
    if db.engine.dialect.name == "postgresql":
        assert len(statements) == 1  # the second batch: saves and releases in one statement


def test_an_answer_ending_alone_is_saved_and_freed_in_one_go(app, conversation):
    """finish_many with one answer (PostgreSQL: one statement in autocommit, webapp.answers._finish_alone):
    the outcome is written, the conversation freed, and the connection left with no transaction; a row
    gone meanwhile reports nothing saved and writes nothing."""
    from sqlalchemy import event

    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    usage = {"done_reason": "stop", "completion_tokens": 2}
    _, answer = answers.open_answer(reload(Conversation, conversation.id), "tinyllama", None, prompt="hi")
    conversation_id = conversation.id
    db.session.commit()  # the finish runs with no transaction open, as a generation's does
    statements = []

    def record(connection, cursor, statement, *args):
        statements.append(statement)
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        assert answers.finish_many([(answer.id, conversation_id, "complete", "a\x00b", None, None, usage)]) == {
            answer.id}
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert len(statements) == (1 if db.engine.dialect.name == "postgresql" else 2)  # not a silent fallback
    assert not db.session().in_transaction()
    row = reload(Message, answer.id)
    assert (row.status, row.content, row.completion_tokens, row.done_reason) == ("complete", "a\ufffdb", 2, "stop")
    freed = reload(Conversation, conversation.id)
    assert freed.active_message_id is None and freed.updated_at >= row.created_at
    db.session.rollback()

    _, second = answers.open_answer(reload(Conversation, conversation.id), "tinyllama", None, prompt="again")
    db.session.commit()
    db.session.delete(reload(Message, second.id))
    db.session.commit()
    assert answers.finish_many([(second.id, conversation.id, "complete", "lost", None, None, usage)]) == set()
    assert reload(Message, second.id) is None
    assert reload(Conversation, conversation.id).active_message_id is None
