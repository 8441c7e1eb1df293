"""The fair queue in front of the model, against gunicorn as shipped (two gevent workers, PostgreSQL):
at most LLM_MAX_PARALLEL answers reach the model at once whichever worker runs them, the rest wait
round-robin across people and are told their place, and a wait past LLM_QUEUE_TIMEOUT is saved as an
error like any other failure. The first test runs on SQLite too (two workers, one file)."""
import threading
import time

import pytest
import requests
from sqlalchemy import select

from helpers import PASSWORD, both_databases, make_user
from live import LiveServer, login, sse_events

NO_USER_LIMITS = {"USER_MAX_RUNNING": 0, "USER_MAX_PER_MINUTE": 0}


@pytest.fixture
def servers(app, ollama, database_url):
    started = []

    def start(**env):
        server = LiveServer(database_url, ollama.url, workers=2, **{**NO_USER_LIMITS, **env}).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


def stream(server, auth, prompt, record, conversation_id=None, queued=None):
    """One streamed turn read to the end; `record` gets (prompt, events, first-token time).
    `queued`: an Event set once the stream says it waits in line."""
    events, first = [], None
    body = {"prompt": prompt, "stream": True}
    if conversation_id:
        body["conversation_id"] = conversation_id
    with requests.post(server.url + "/chat/", json=body, headers=auth, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        for name, data in sse_events(response):
            if name == "token" and first is None:
                first = time.monotonic()
            if name == "queued" and queued is not None:
                queued.set()
            events.append((name, data))
    record[prompt] = (events, first)


def prompts_in_model_order(ollama):
    return [request["messages"][-1]["content"] for request in ollama.chat_requests if request.get("messages")]


@both_databases  # SQLite: the same queue, its single writer standing in for the advisory lock
def test_two_at_a_time_across_workers_round_robin_across_people(servers, app, ollama):
    server = servers(LLM_MAX_PARALLEL=2)
    make_user(app)
    make_user(app, "bob")
    alice, bob = login(server.url, "alice", PASSWORD), login(server.url, "bob", PASSWORD)
    reply = " ".join(f"w{i}" for i in range(25))
    ollama.script(reply=reply, delay=0.1)  # ~2.5 s per answer at the model: alice's first two outlast the asking
    record, threads, waiting = {}, [], []

    def ask(auth, prompt):
        waiting.append(threading.Event())
        threads.append(threading.Thread(target=stream, args=(server, auth, prompt, record), kwargs={
            "queued": waiting[-1]}))
        threads[-1].start()
    # alice asks four things, one after another (each has reached the model or the queue before the
    # next is sent: two workers must not overtake each other on a loaded box)...
    for n in range(2):
        ask(alice, f"alice {n}")
        deadline = time.monotonic() + 10
        while len(ollama.chat_requests) <= n:
            assert time.monotonic() < deadline, "alice's answer never reached the model"
            time.sleep(0.01)
    for n in range(2, 4):
        ask(alice, f"alice {n}")
        assert waiting[n].wait(10)  # two run, two wait
    for n in range(2):  # ...and bob two, a little later, while alice's first two still run
        ask(bob, f"bob {n}")
    assert waiting[4].wait(10) and waiting[5].wait(10)
    assert len(ollama.chat_requests) == 2
    for thread in threads:
        thread.join(60)

    assert len(record) == 6
    for prompt, (events, _) in record.items():
        assert events[-1][0] == "done" and events[-1][1]["response"] == reply, (prompt, events[-1])
    assert ollama.peak_streams == 2  # never more at the model than LLM_MAX_PARALLEL, across both workers
    order = prompts_in_model_order(ollama)
    assert sorted(order[:2]) == ["alice 0", "alice 1"]
    # Round-robin across people: one of bob's answers, queued after both of alice's waiting ones, runs
    # with the first slots that free up (first come, first served would run bob's fifth and sixth).
    assert [prompt.split()[0] for prompt in order[2:4]].count("bob") == 1, order

    # Places in line were told before any token; none for those that ran at once.
    for prompt in ("alice 0", "alice 1"):
        assert "queued" not in [name for name, _ in record[prompt][0]]
    for prompt in ("alice 2", "alice 3", "bob 0", "bob 1"):
        names = [name for name, _ in record[prompt][0]]
        assert names[0] == "start" and names[1] == "queued", (prompt, names)
        places = [data["position"] for name, data in record[prompt][0] if name == "queued"]
        # A place can grow (bob's first answer goes ahead of alice's second waiting one), and two
        # slots may free at once, so the last place told need not be 1.
        assert all(1 <= place <= 4 for place in places), (prompt, places)
        assert names.index("queued") < names.index("token")
    assert max(data["position"] for prompt in ("alice 2", "alice 3")
               for name, data in record[prompt][0] if name == "queued") >= 2

    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        statuses = db.session.scalars(select(Message.status).where(Message.role == "assistant")).all()
    assert statuses == ["complete"] * 6


def test_a_wait_past_the_queue_timeout_is_saved_as_an_error(servers, app, ollama):
    server = servers(LLM_MAX_PARALLEL=1, LLM_QUEUE_TIMEOUT=1, LLM_READ_TIMEOUT=10)
    make_user(app)
    make_user(app, "bob")
    alice, bob = login(server.url, "alice", PASSWORD), login(server.url, "bob", PASSWORD)
    ollama.script(reply=" ".join(f"w{i}" for i in range(40)), delay=0.1)  # 4 s: holds the only slot
    record = {}
    holder = threading.Thread(target=stream, args=(server, alice, "long", record))
    holder.start()
    assert ollama.wait_for_event("chat_start", timeout=10)

    started = time.monotonic()
    response = requests.post(server.url + "/chat/", json={"prompt": "waits too long"}, headers=bob, timeout=30)
    assert 0.8 < time.monotonic() - started < 3
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "queue_timeout" and "busy" in error["message"]

    stream(server, bob, "streams too long", record)
    events = record["streams too long"][0]
    assert [name for name, _ in events][:2] == ["start", "queued"]
    assert events[-1][0] == "failed" and events[-1][1]["error"]["code"] == "queue_timeout"
    assert events[-1][1]["status"] == "error"
    holder.join(30)

    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        rows = db.session.execute(select(Message.content, Message.status, Message.error_code)
                                  .where(Message.role == "assistant").order_by(Message.id)).all()
    assert [tuple(row)[1:] for row in rows] == [("complete", None), ("error", "queue_timeout"),
                                                ("error", "queue_timeout")]
    assert [prompt for prompt in prompts_in_model_order(ollama)] == ["long"]  # the model never saw the others


def test_stop_while_queued_saves_cancelled_and_frees_the_conversation(servers, app, ollama):
    server = servers(LLM_MAX_PARALLEL=1, LLM_READ_TIMEOUT=10)
    make_user(app)
    auth = login(server.url, "alice", PASSWORD)
    ollama.script(reply=" ".join(f"w{i}" for i in range(20)), delay=0.1)
    record = {}
    holder = threading.Thread(target=stream, args=(server, auth, "long", record))
    holder.start()
    assert ollama.wait_for_event("chat_start", timeout=10)
    with requests.post(server.url + "/chat/", json={"prompt": "queued", "stream": True}, headers=auth,
                       stream=True, timeout=30) as response:
        events = sse_events(response)
        name, start = next(events)
        assert name == "start" and next(events) == ("queued", {"position": 1})
        stopped = requests.post(server.url + f"/conversations/{start['conversation_id']}/stop", headers=auth,
                                timeout=10)
        assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
        rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "cancelled"
    holder.join(30)
    assert prompts_in_model_order(ollama) == ["long"]


@pytest.mark.browser
def test_the_page_says_how_many_are_ahead(servers, app, ollama, chromium):
    from playwright.sync_api import expect

    from helpers import ask, last_answer, sign_in_page
    server = servers(LLM_MAX_PARALLEL=1, LLM_READ_TIMEOUT=10)
    for name in ("alice", "bob", "carol", "dave"):
        make_user(app, name)
    ollama.script(reply=" ".join(f"w{i}" for i in range(60)), delay=0.1)  # 6 s each
    record, threads = {}, []
    for name in ("bob", "carol", "dave"):  # bob's runs; carol's and dave's wait
        auth = login(server.url, name, PASSWORD)
        threads.append(threading.Thread(target=stream, args=(server, auth, name, record)))
        threads[-1].start()
        if name == "bob":
            assert ollama.wait_for_event("chat_start", timeout=10)
        time.sleep(0.2)
    context = chromium.new_context()
    page = context.new_page()
    page.base = server.url
    try:
        sign_in_page(page)
        ask(page, "my turn?")
        expect(last_answer(page).locator(".working")).to_have_text("Waiting for the model: 2 ahead of you…",
                                                                   timeout=10_000)
        # Stop while waiting: the bubble ends as stopped, and the model never saw the question.
        last_answer(page).get_by_role("button", name="Stop the answer").click()
        expect(last_answer(page).locator(".notice")).to_have_text("Stopped.", timeout=10_000)
    finally:
        context.close()
    for thread in threads:
        thread.join(40)
    assert "my turn?" not in prompts_in_model_order(ollama)
