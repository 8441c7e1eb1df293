"""The non-streaming turn generates its answer in its own request (no task, no hand-off, no re-read),
and keeps every guarantee of a background generation: Stop, a deleted conversation, a request
killed mid-answer. On PostgreSQL and SQLite."""
import contextlib
import threading
import time

import pytest
from sqlalchemy import select

from helpers import both_databases

pytestmark = both_databases
REPLY = "one two three four five six seven eight nine ten eleven twelve"


def answer_row(app, message_id):
    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        return db.session.scalar(select(Message).where(Message.id == message_id))


def in_background(app, auth, body):
    """POST /chat/ on a thread of its own; returns (thread, result dict)."""
    result = {}

    def post():
        result["response"] = app.test_client().post("/chat/", json=body, headers=auth)
    thread = threading.Thread(target=post)
    thread.start()
    return thread, result


def live_answer(app, timeout=5.0):
    """The id of the answer being generated in this process (waits for its first token)."""
    registry = app.extensions["generations"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message_id in registry.ids():
            live = registry.get(message_id)
            if live is not None and live.text:
                return message_id
        time.sleep(0.01)
    raise AssertionError("no answer started generating")


@contextlib.contextmanager
def statements_of_this_thread(app):
    """The first word of each SQL statement this thread runs inside the block (not the watchdog's or
    the orphan sweeper's): how many round trips a turn costs."""
    from sqlalchemy import event

    from webapp.extensions import db
    with app.app_context():
        engine = db.engine
    statements, me = [], threading.get_ident()

    def record(connection, cursor, statement, *args):
        if threading.get_ident() == me:
            statements.append(statement.split(None, 1)[0].upper())
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_non_streaming_turn_starts_no_background_task(app, client, auth, ollama, monkeypatch):
    from webapp import generation
    started = []
    spawn = generation.spawn

    def recording_spawn(target, *args, name=None):
        started.append(name)
        return spawn(target, *args, name=name)
    monkeypatch.setattr(generation, "spawn", recording_spawn)
    ollama.script(reply=REPLY)
    response = client.post("/chat/", json={"prompt": "hi"}, headers=auth)
    assert response.status_code == 200 and response.get_json()["response"] == REPLY
    assert not [name for name in started if name and name.startswith("generation-") and name != "generation-watchdog"]
    body = response.get_json()
    row = answer_row(app, body["message_id"])
    assert (row.status, row.content, row.completion_tokens) == ("complete", REPLY, body["usage"]["completion_tokens"])


def test_stop_from_another_request_ends_a_non_streaming_turn(app, auth, ollama):
    ollama.script(reply=REPLY, delay=0.1)
    thread, result = in_background(app, auth, {"prompt": "go"})
    message_id = live_answer(app)
    conversation_id = answer_row(app, message_id).conversation_id
    stop = app.test_client().post(f"/conversations/{conversation_id}/stop", headers=auth)
    thread.join(10)
    assert stop.status_code == 200 and stop.get_json()["status"] == "cancelled"
    body = result["response"].get_json()
    assert result["response"].status_code == 200 and body["status"] == "cancelled"
    assert body["response"] and len(body["response"]) < len(REPLY) and REPLY.startswith(body["response"])
    row = answer_row(app, message_id)
    assert (row.status, row.content) == ("cancelled", body["response"])


def test_a_conversation_deleted_during_a_non_streaming_turn_answers_404(app, auth, ollama):
    ollama.script(reply=REPLY, delay=0.1)
    thread, result = in_background(app, auth, {"prompt": "go"})
    message_id = live_answer(app)
    conversation_id = answer_row(app, message_id).conversation_id
    assert app.test_client().delete(f"/conversations/{conversation_id}", headers=auth).status_code == 204
    thread.join(10)
    assert result["response"].status_code == 404
    assert result["response"].get_json()["error"]["code"] == "not_found"
    assert answer_row(app, message_id) is None


class Killed(BaseException):
    """What gevent raises in a greenlet it kills (GreenletExit), e.g. a worker past its graceful timeout."""


def test_a_request_killed_mid_answer_saves_the_answer_as_interrupted(app, user, ollama):
    from webapp import llm, service
    from webapp.extensions import db
    from webapp.models import Conversation, User

    class DyingClient:
        def chat_stream(self, messages, model, options=None, abort=None, gather=0.0):
            yield llm.Chunk(text="half an ")
            yield llm.Chunk(text="answer")
            raise Killed()
    with app.test_request_context():
        app.extensions["llm"]._client = DyingClient()
        turn = service.start_turn(db.session.get(User, user), "go", run_here=True)
        with pytest.raises(Killed):
            service.answer_here(turn)
        row = answer_row(app, turn.message_id)
        assert (row.status, row.content, row.error_code) == ("interrupted", "half an answer", "interrupted")
        db.session.expire_all()
        assert db.session.get(Conversation, turn.conversation_id).active_message_id is None  # free for a retry
        assert not app.extensions["generations"].ids()


def test_a_turn_that_starts_a_conversation_opens_it_in_one_statement(make_app, ollama, database_url):
    """With nothing to run before it (no per-person limits, no Idempotency-Key) and no queue in front of
    the model (each queued answer's admission has statements of its own), a turn that starts a
    conversation, on PostgreSQL, costs two statements, each its own transaction: ONE statement checking
    the token's row and writing the conversation (claimed by its answer), the prompt and the answer
    (answers.open_in_new_conversation, service.token_check), and the final save. Every row is as the general path writes
    it, and the conversation is free again after."""
    from helpers import login_token, make_user
    app = make_app(USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0, LLM_MAX_PARALLEL=0)
    make_user(app)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    ollama.script(reply=REPLY)
    from webapp.extensions import db
    with statements_of_this_thread(app) as statements:
        response = client.post("/chat/", json={"prompt": "  привет, world  "}, headers=auth)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    postgres = database_url.startswith("postgresql")
    if postgres:  # WITH ... (the token's row and the opening), WITH ... (the final save)
        assert statements == ["WITH", "WITH"], statements
    from webapp.models import Conversation, Message
    with app.app_context():
        conversation = db.session.get(Conversation, body["conversation_id"])
        rows = db.session.scalars(select(Message).where(Message.conversation_id == conversation.id)
                                  .order_by(Message.id)).all()
        assert (conversation.title, conversation.message_count, conversation.active_message_id,
                conversation.model, conversation.source) == ("привет, world", 2, None, "tinyllama", "web")
        assert [(m.id, m.role, m.content, m.status, m.model) for m in rows] == [
            (body["user_message_id"], "user", "  привет, world  ", "complete", None),
            (body["message_id"], "assistant", REPLY, "complete", "tinyllama")]
        assert rows[0].request_id == rows[1].request_id == body["request_id"]
        assert rows[1].heartbeat_at is not None and rows[0].heartbeat_at is None
        assert rows[0].created_at == rows[1].created_at >= conversation.created_at
    second = client.post("/chat/", json={"prompt": "again", "conversation_id": body["conversation_id"]}, headers=auth)
    assert second.status_code == 200 and second.get_json()["response"] == REPLY


def test_the_per_person_limits_are_decided_inside_the_one_statement_opening(make_app, ollama, database_url):
    """With the limits on (the default), a turn that starts a conversation still opens it in one
    statement on PostgreSQL, after the person's lock: the lock (which reads the token's row too:
    service.token_check), the opening (which counts, tidies and records the start only where the
    limits allow), the final save. A refused turn
    writes nothing and says which limit and when to retry; expired starts are tidied on the way."""
    from sqlalchemy import func

    from webapp.extensions import db
    from webapp.models import Conversation, Message, RateLimitHit
    from webapp.service.fairness import _key

    from helpers import login_token, make_user
    app = make_app(USER_MAX_RUNNING=2, USER_MAX_PER_MINUTE=2, LLM_MAX_PARALLEL=0)
    user_id = make_user(app)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    ollama.script(reply=REPLY)
    key, now = _key(user_id), time.time()
    with app.app_context():  # three starts from two minutes ago: past the window, due for tidying
        db.session.add_all([RateLimitHit(key=key, at=now - 120, expires_at=now - 60) for _ in range(3)])
        db.session.commit()
    with statements_of_this_thread(app) as statements:
        first = client.post("/chat/", json={"prompt": "one"}, headers=auth)
    assert first.status_code == 200, first.get_json()
    if database_url.startswith("postgresql"):  # the lock with the token's row, the opening, the save
        assert statements == ["WITH", "WITH", "WITH"], statements
    with app.app_context():
        hits = db.session.scalars(select(RateLimitHit.at).where(RateLimitHit.key == key)).all()
        assert len(hits) == 1 and hits[0] > now - 5  # the expired three tidied, this start counted
    assert client.post("/chat/", json={"prompt": "two"}, headers=auth).status_code == 200
    refused = client.post("/chat/", json={"prompt": "three"}, headers=auth)
    assert refused.status_code == 429, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "too_many_answers" and "at most 2 answers a minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Conversation)) == 2  # nothing of "three"
        assert db.session.scalar(select(func.count()).select_from(Message)) == 4
        assert db.session.scalar(select(func.count()).select_from(RateLimitHit).where(RateLimitHit.key == key)) == 2


def test_a_first_message_on_the_page_opens_its_conversation_in_one_statement(make_app, ollama, database_url):
    """The browser door as the bearer one: the session cookie's check is one read run alone (no
    transaction left open), so the page's first message opens its conversation in one statement on
    PostgreSQL, after the person's lock (limits on, the default), and the page follows it."""
    from webapp.extensions import db
    from webapp.models import Conversation, Message

    from helpers import make_user, sign_in, wait_idle
    app = make_app(LLM_MAX_PARALLEL=0)
    make_user(app)
    ollama.script(reply=REPLY)
    browser = app.test_client()
    token = sign_in(browser)
    with statements_of_this_thread(app) as statements:
        response = browser.post("/c/new", data={"prompt": "hello from the page", "csrf_token": token})
    assert response.status_code in (302, 303), response.get_data(as_text=True)
    if database_url.startswith("postgresql"):  # the session's read, the person's lock, the opening
        assert statements == ["SELECT", "SELECT", "WITH"], statements
    conversation_id = int(response.headers["Location"].rstrip("/").rsplit("/", 1)[-1])
    wait_idle(app)
    with app.app_context():
        conversation = db.session.get(Conversation, conversation_id)
        rows = db.session.scalars(select(Message).where(Message.conversation_id == conversation_id)
                                  .order_by(Message.id)).all()
        assert conversation.title == "hello from the page" and conversation.active_message_id is None
        assert [(m.role, m.content, m.status) for m in rows] == [
            ("user", "hello from the page", "complete"), ("assistant", REPLY, "complete")]
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "hello from the page" in page and "alice" in page



@pytest.mark.parametrize("limits", [0, 2], ids=["limits-off", "limits-on"])
def test_a_turn_in_an_existing_conversation_claims_it_in_one_statement(make_app, ollama, database_url, limits):
    """A turn in an existing conversation claims it first, in one statement with its prompt and
    answer (on PostgreSQL; after the person's lock when the limits are on), reads the context, and
    saves the answer: the rows are as the general path writes them, prompt before answer. A
    conversation that is busy, not this person's or gone is not claimed: the general path says why,
    and the start is not counted."""
    from sqlalchemy import func

    from webapp.extensions import db
    from webapp.models import Conversation, Message, RateLimitHit

    from helpers import login_token, make_user
    app = make_app(USER_MAX_RUNNING=limits, USER_MAX_PER_MINUTE=limits * 10, LLM_MAX_PARALLEL=0)
    make_user(app)
    make_user(app, "bob")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    ollama.script(reply=REPLY)
    first = client.post("/chat/", json={"prompt": "first"}, headers=auth).get_json()
    conversation_id = first["conversation_id"]
    with statements_of_this_thread(app) as statements:
        second = client.post("/chat/", json={"prompt": "second", "conversation_id": conversation_id,
                                              "model": "llama3.2"}, headers=auth)
    assert second.status_code == 200, second.get_json()
    body = second.get_json()
    if database_url.startswith("postgresql"):
        # limits off: the claim with both rows and the token's row (service.token_check), the context, the save;
        # limits on: the lock with the token's row, the claim with both rows, the context, the save
        assert statements == [*(["WITH"] if limits else []), "WITH", "SELECT", "WITH"], statements
    assert ollama.chat_requests[-1]["messages"] == [{"role": "user", "content": "first"},
                                               {"role": "assistant", "content": REPLY},
                                               {"role": "user", "content": "second"}]
    with app.app_context():
        conversation = db.session.get(Conversation, conversation_id)
        rows = db.session.scalars(select(Message).where(Message.conversation_id == conversation_id)
                                  .order_by(Message.id)).all()
        assert (conversation.message_count, conversation.active_message_id, conversation.model) == (
            4, None, "tinyllama")
        assert [(m.role, m.content, m.status, m.model) for m in rows] == [
            ("user", "first", "complete", None), ("assistant", REPLY, "complete", "tinyllama"),
            ("user", "second", "complete", None), ("assistant", REPLY, "complete", "llama3.2")]
        assert [rows[2].id, rows[3].id] == [body["user_message_id"], body["message_id"]]
        assert rows[3].request_id == rows[2].request_id == body["request_id"]
        hits = db.session.scalar(select(func.count()).select_from(RateLimitHit))
    assert hits == (2 if limits else 0)
    # Not claimed: someone else's conversation (404), then a busy one (409); neither start is counted.
    bob = {"Authorization": f"Bearer {login_token(client, 'bob')}"}
    other = client.post("/chat/", json={"prompt": "mine?", "conversation_id": conversation_id}, headers=bob)
    assert other.status_code == 404 and other.get_json()["error"]["code"] == "not_found"
    ollama.script(reply=REPLY, delay=0.1)
    thread, _ = in_background(app, auth, {"prompt": "slow", "conversation_id": conversation_id})
    live_answer(app)
    busy = client.post("/chat/", json={"prompt": "meanwhile", "conversation_id": conversation_id}, headers=auth)
    assert busy.status_code == 409 and busy.get_json()["error"]["code"] == "conversation_busy"
    thread.join(10)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(RateLimitHit)) == (3 if limits else 0)
        assert db.session.scalar(select(func.count()).select_from(Message).where(
            Message.conversation_id == conversation_id)) == 6


@pytest.mark.parametrize("limits", [0, 2], ids=["limits-off", "limits-on"])
def test_a_v1_call_with_history_opens_its_conversation_in_one_statement(make_app, ollama, database_url, limits):
    """The OpenAI-compatible door's usual call (a system prompt, earlier messages, then the prompt,
    no conversation named): on PostgreSQL the conversation, every earlier message, the prompt and the
    answer are written in one statement (after the person's lock when the limits are on). The rows
    keep the client's order, and the model gets exactly the client's messages."""
    from webapp.extensions import db
    from webapp.models import Conversation, Message

    from helpers import login_token, make_user
    app = make_app(USER_MAX_RUNNING=limits, USER_MAX_PER_MINUTE=limits * 10, LLM_MAX_PARALLEL=0)
    make_user(app)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    ollama.script(reply=REPLY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "раз"},
                {"role": "assistant", "content": "one"}, {"role": "user", "content": "nul\x00here"},
                {"role": "assistant", "content": "two"}, {"role": "user", "content": "три?"}]
    with statements_of_this_thread(app) as statements:
        response = client.post("/v1/chat/completions", json={"model": "tinyllama", "messages": messages},
                               headers=auth)
    assert response.status_code == 200, response.get_json()
    if database_url.startswith("postgresql"):  # [lock with the token's row], the opening with every row
        assert statements == [*(["WITH"] if limits else []), "WITH"], statements  # (its task saves the answer)
    assert ollama.chat_requests[-1]["messages"] == messages
    conversation_id = int(response.headers["X-Conversation-Id"])
    with app.app_context():
        conversation = db.session.get(Conversation, conversation_id)
        rows = db.session.scalars(select(Message).where(Message.conversation_id == conversation_id)
                                  .order_by(Message.id)).all()
        assert (conversation.system_prompt, conversation.source, conversation.message_count,
                conversation.active_message_id, conversation.title) == ("Be brief.", "api", 6, None, "три?")
        assert [(m.role, m.content, m.status) for m in rows] == [
            ("user", "раз", "complete"), ("assistant", "one", "complete"), ("user", "nul\ufffdhere", "complete"),
            ("assistant", "two", "complete"), ("user", "три?", "complete"), ("assistant", REPLY, "complete")]
        assert rows[-1].model == "tinyllama" and len({m.request_id for m in rows}) == 1
    # The history as stored, continued in that conversation: only what is new is stored.
    messages[3]["content"] = "nul\ufffdhere"
    messages += [{"role": "assistant", "content": REPLY}, {"role": "user", "content": "four"}]
    again = client.post("/v1/chat/completions", json={"model": "tinyllama", "messages": messages},
                        headers={**auth, "X-Conversation-Id": str(conversation_id)})
    assert again.status_code == 200 and again.headers["X-Conversation-Id"] == str(conversation_id)
    with app.app_context():
        assert db.session.get(Conversation, conversation_id).message_count == 8
