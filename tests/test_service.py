"""The chat service (webapp/service/) called directly, as both doors call it, on PostgreSQL and SQLite."""
import threading

import pytest
from sqlalchemy import event, func, select

from helpers import both_databases, make_user, wait_idle

pytestmark = both_databases


def rows(conversation_id):
    from webapp.extensions import db
    from webapp.models import Message
    return [(m.role, m.status, m.content) for m in db.session.scalars(
        select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))]


def test_a_turn_saves_the_prompt_before_the_model_answers(app, alice, ollama):
    from webapp import service
    ollama.script(reply="Hello there.")
    turn = service.start_turn(alice, "Hi!", request_id="r1")
    # What the caller gets back is readable after the commit, without another query.
    # 'queued': the fair queue in front of the model is on by default (LLM_MAX_PARALLEL=4)
    assert (turn.prompt, turn.model, turn.answer.status) == ("Hi!", "tinyllama", "queued")
    assert turn.conversation.title == "Hi!" and turn.conversation.active_message_id == turn.message_id
    final = service.wait_final(turn.message_id, timeout=5)
    assert final.status == "complete" and final.content == "Hello there."
    assert rows(turn.conversation_id) == [("user", "complete", "Hi!"), ("assistant", "complete", "Hello there.")]
    assert service.get_conversation(alice, turn.conversation_id).message_count == 2


def test_waiting_for_an_answer_that_just_ended_reads_nothing(app, alice, ollama, monkeypatch):
    """A fast answer may end before its request starts waiting for it (/v1 waits this way): its
    final row, as its save stored it, is still at hand in memory for a few seconds; after that
    the row is read."""
    import time

    from webapp import generation, service
    from webapp.extensions import db
    from webapp.generation import generations
    ollama.script(reply="Quick.")
    turn = service.start_turn(alice, "Hi!")
    deadline = time.monotonic() + 5
    while generations.get(turn.message_id) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generations.get(turn.message_id) is None  # ended, no longer live
    statements = []

    def record(connection, cursor, statement, *args):
        statements.append(statement)
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        final = service.wait_final(turn.message_id, timeout=5)
        assert (final.status, final.content) == ("complete", "Quick.") and statements == []
        monkeypatch.setattr(generation, "ENDED_SECONDS", 0.0)  # long ago: the row is read
        assert service.wait_final(turn.message_id, timeout=5).content == "Quick." and statements
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def test_one_answer_at_a_time_per_conversation(app, alice, ollama):
    from webapp import service
    from webapp.errors import ServiceError
    ollama.script(reply="slow " * 20, delay=0.05)
    turn = service.start_turn(alice, "first")
    with pytest.raises(ServiceError) as refused:
        service.start_turn(alice, "second", turn.conversation_id)
    assert (refused.value.status, refused.value.code) == (409, "conversation_busy")
    saved = rows(turn.conversation_id)  # the refused prompt left nothing (the answer may have text by now)
    assert [(role, content) for role, _, content in saved][:1] == [("user", "first")]
    assert [role for role, _, _ in saved] == ["user", "assistant"]
    service.wait_final(service.stop(alice, turn.conversation_id), timeout=5)
    wait_idle(app)
    assert rows(turn.conversation_id)[-1][1] == "cancelled"


def test_regenerate_replaces_the_last_answer(app, alice, ollama):
    from webapp import service
    ollama.script(reply="one")
    turn = service.start_turn(alice, "say a number")
    service.wait_final(turn.message_id, timeout=5)
    ollama.script(reply="two")
    again = service.regenerate(alice, turn.conversation_id)
    assert service.wait_final(again.message_id, timeout=5).content == "two"
    assert rows(turn.conversation_id) == [("user", "complete", "say a number"), ("assistant", "complete", "two")]
    assert service.get_conversation(alice, turn.conversation_id).message_count == 2


def test_context_is_the_system_prompt_and_the_newest_messages(app, alice, ollama):
    from webapp import service
    ollama.script(reply="ok")
    turn = service.start_turn(alice, "first question")
    service.wait_final(turn.message_id, timeout=5)
    service.update_conversation(alice, turn.conversation_id, system_prompt="Be brief.")
    second = service.start_turn(alice, "second question", turn.conversation_id)
    service.wait_final(second.message_id, timeout=5)
    assert ollama.chat_requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second question"}]


def test_someone_elses_ids_look_missing(app, alice, ollama):
    from webapp import service
    from webapp.errors import ServiceError
    from webapp.extensions import db
    from webapp.models import User
    ollama.script(reply="mine")
    turn = service.start_turn(alice, "private")
    service.wait_final(turn.message_id, timeout=5)
    make_user(app, "mallory")
    mallory = db.session.scalar(select(User).where(User.username == "mallory"))
    for call in (lambda: service.get_conversation(mallory, turn.conversation_id),
                 lambda: service.get_message(mallory, turn.message_id),
                 lambda: service.get_message(alice, turn.message_id, turn.conversation_id + 1),
                 lambda: service.export_markdown(mallory, turn.conversation_id),
                 lambda: service.start_turn(mallory, "hi", turn.conversation_id)):
        with pytest.raises(ServiceError) as refused:
            call()
        assert refused.value.status == 404


def test_export_reads_the_whole_conversation(app, alice, ollama):
    from webapp import service
    ollama.script(reply="**bold** answer")
    turn = service.start_turn(alice, "a question")
    service.wait_final(turn.message_id, timeout=5)
    conversation, text = service.export_markdown(alice, turn.conversation_id)
    assert text.startswith("# a question\n") and "## You\n\na question" in text
    assert "## Assistant (tinyllama)\n\n**bold** answer" in text


@pytest.mark.parametrize("fairness", ["off", "on"])
def test_a_new_turn_uses_few_statements(app, alice, ollama, fairness):
    """One transaction saves the prompt, claims the conversation and creates the answer: count them.
    The per-person limits (on by default, off in the bench) add three: their lock, one SELECT that
    counts, the INSERT of the start."""
    from webapp import service
    from webapp.extensions import db
    if fairness == "off":
        app.config.update(USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0)
    ollama.script(reply="ok")
    first = service.start_turn(alice, "warm up")
    service.wait_final(first.message_id, timeout=5)
    wait_idle(app)
    statements = []
    engine = db.engine
    me = threading.get_ident()

    def listener(conn, cursor, statement, *args):
        if threading.get_ident() == me:  # not the background generations' own statements
            statements.append(statement)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        turn = service.start_turn(alice, "again", first.conversation_id)
        here = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    service.wait_final(turn.message_id, timeout=5)
    # SELECT conversation, INSERT prompt and answer, claim UPDATE, context SELECT (+ SQLite's RETURNING
    # may split the INSERT in two): nothing else before the model is called.
    assert here <= (6 if fairness == "off" else 9), statements[:here]
    assert db.session.scalar(select(func.count()).select_from(db.Model.metadata.tables["messages"])) == 4


def test_a_background_answer_is_read_in_windows_and_followed_one_event_per_window(app, alice, ollama, monkeypatch):
    """A generation in the background reads the model once per GATHER_SECONDS after its first token
    (llm.Gathering), and its follower wakes and sends once per read, not once per token."""
    from webapp import generation
    monkeypatch.setattr(generation, "GATHER_SECONDS", 0.3)
    tokens, elapsed, words = _follow_twenty_words(alice, ollama)
    assert len(tokens) <= elapsed / 0.3 + 3 < len(words)


def _follow_twenty_words(user, ollama):
    """A background answer of 20 words, 20 ms apart, followed to its end: (its token events, the
    seconds that took, the words); the events add up to the answer, as saved."""
    import time

    from webapp import service
    words = [f"w{index} " for index in range(20)]
    ollama.script(reply="".join(words), delay=0.02)
    turn = service.start_turn(user, "count")
    started = time.monotonic()
    events = list(service.follow(turn.message_id))
    elapsed = time.monotonic() - started
    tokens = [value for kind, value in events if kind == "token"]
    assert "".join(tokens) == "".join(words) and events[-1][1].content == "".join(words)
    return tokens, elapsed, words


def test_a_worker_reading_many_answers_widens_their_windows(app, alice, ollama, monkeypatch):
    """Past GATHER_READS_PER_SECOND x GATHER_SECONDS answers (or requests) at once, each answer's window
    is its share of the worker's reads (up to GATHER_MAX_SECONDS), asked anew before each read: a
    background answer started here while the worker is busy is read, and followed, in the wider windows."""
    from webapp import generation
    registry = app.extensions["generations"]
    assert registry.window() == generation.GATHER_SECONDS  # alone: the usual window
    busy = {index: None for index in range(-1, -151, -1)}  # 150 answers being read elsewhere in this worker
    monkeypatch.setattr(registry, "_live", busy)
    assert generation.GATHER_SECONDS < registry.window() == pytest.approx(150 / generation.GATHER_READS_PER_SECOND)
    busy.update({index: None for index in range(-151, -5001, -1)})
    assert registry.window() == generation.GATHER_MAX_SECONDS
    busy.clear()
    requests = app.extensions["open_requests"]  # or 180 requests served at once (a burst of stream starts)
    monkeypatch.setattr(requests, "count", 180)
    assert registry.window() == pytest.approx(180 / generation.GATHER_READS_PER_SECOND)
    monkeypatch.setattr(requests, "count", 0)
    monkeypatch.setattr(generation, "GATHER_READS_PER_SECOND", 5)  # the answer alone is a busy worker now
    monkeypatch.setattr(generation, "GATHER_SECONDS", 0.01)
    tokens, elapsed, words = _follow_twenty_words(alice, ollama)
    assert len(tokens) <= elapsed / 0.2 + 3 < len(words)  # one live answer at 5 reads a second: 0.2 s


def test_a_follower_ends_with_the_answer_not_after_its_gathering_window(app, alice, ollama, monkeypatch):
    """A follower gathers tokens for COALESCE_SECONDS before sending them on; the answer's end cuts that
    short (Live.ended), so a stream is never held back once its answer is whole."""
    import time

    from webapp import service
    from webapp.service import turns
    monkeypatch.setattr(turns, "COALESCE_SECONDS", 5.0)
    ollama.script(reply="one two three four", delay=0.2)
    turn = service.start_turn(alice, "count")
    started = time.monotonic()
    events = list(service.follow(turn.message_id))
    assert events[-1][0] == "done" and events[-1][1].content == "one two three four"
    assert [kind for kind, _ in events].count("token") >= 2  # the first token went ahead, then the rest together
    assert time.monotonic() - started < 4  # the answer's end, not the 5 s window
