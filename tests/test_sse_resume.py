"""One stream protocol (DESIGN.md): resumable SSE by the standard, checked with clients nobody on this
project wrote (httpx-sse, and the npm `eventsource` WHATWG EventSource under Node), against gunicorn;
and tokens pushed across workers over PostgreSQL LISTEN/NOTIFY."""
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests
from httpx_sse import connect_sse

from helpers import PASSWORD, both_databases, make_user, page_sign_in
from live import login, sse_events

NODE_DIR = Path(__file__).resolve().parent / "sse_node"
WORDS = [f"w{n} " for n in range(40)]
REPLY = "".join(WORDS)


@pytest.fixture
def two(servers, app):
    """Two gunicorn servers over one database: a reconnect to `b` is a reconnect to another worker."""
    make_user(app)
    a, b = servers(), servers()
    a.auth = b.auth = login(a.url, "alice", PASSWORD)
    return a, b


@pytest.fixture(scope="module")
def node_eventsource():
    """npm's `eventsource` (pinned in tests/sse_node/package.json), installed once into the
    git-ignored tests/sse_node/node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are needed for the EventSource client test")
    if not (NODE_DIR / "node_modules" / "eventsource").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300,
                       capture_output=True)
    return node


def saved(app, message_id):
    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        message = db.session.get(Message, message_id)
        return message.status, message.content


def wait_final(app, message_id, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, content = saved(app, message_id)
        if status not in ("pending", "streaming"):
            return status, content
        time.sleep(0.05)
    raise AssertionError("the answer did not finish")


def stream_url(server, start):
    return f"{server.url}/conversations/{start['conversation_id']}/messages/{start['message_id']}/stream"


def check_ids(events):
    """Each token's id is the answer's length after it."""
    length = int(events[0][1]) if events else 0
    for text, event_id in events[1:]:
        length += len(text)
        assert int(event_id) == length


@both_databases
def test_httpx_sse_cut_mid_answer_resume_on_another_worker_then_204(two, app, ollama):
    a, b = two
    ollama.script(chunks=WORDS, delay=0.05)
    with httpx.Client(timeout=10, headers=a.auth) as client:
        with connect_sse(client, "POST", a.url + "/chat/", json={"prompt": "count", "stream": True}) as source:
            events = source.iter_sse()
            start = next(events)
            assert (start.event, start.id, start.retry) == ("start", "0", 2000)
            start = start.json()
            got = []
            for event in events:
                assert event.event == "token"
                got.append((event.json()["text"], event.id))
                if len(got) == 3:
                    break  # leaving the block closes the connection mid-answer
        last = got[-1][1]
        assert int(last) == len("".join(text for text, _ in got))
        url = stream_url(b, start)
        with connect_sse(client, "GET", url, headers={"Last-Event-ID": last}) as source:
            rest = list(source.iter_sse())
        assert rest[0].event == "start" and rest[0].id == last
        tokens = [(event.json()["text"], event.id) for event in rest if event.event == "token"]
        check_ids([("", "0")] + got + tokens)
        status, content = wait_final(app, start["message_id"])
        assert status == "complete" and content == REPLY
        assert "".join(text for text, _ in got + tokens) == REPLY  # nothing repeated, nothing lost
        assert rest[-1].event == "done" and rest[-1].id == str(len(REPLY))
        assert rest[-1].json()["response"] == REPLY

        # Already at the end of a finished answer: 204, no body and no content type (EventSource stops).
        for end in (client.get(url, headers={"Last-Event-ID": str(len(REPLY))}),
                    client.get(url, params={"last_event_id": str(len(REPLY))})):
            assert end.status_code == 204 and end.content == b"" and "content-type" not in end.headers
        # The query parameter resumes like the header; a first attach to a finished answer replays it.
        with connect_sse(client, "GET", url, params={"last_event_id": "7"}) as source:
            middle = list(source.iter_sse())
        assert "".join(e.json()["text"] for e in middle if e.event == "token") == REPLY[7:]
        with connect_sse(client, "GET", url) as source:
            whole = list(source.iter_sse())
        assert [e.event for e in whole][0] == "start" and whole[-1].event == "done"
        assert "".join(e.json()["text"] for e in whole if e.event == "token") == REPLY
        assert client.get(url, headers={"Last-Event-ID": "abc"}).status_code == 400


@both_databases
def test_eventsource_client_reconnects_by_itself_on_another_worker_and_stops_at_204(two, app, ollama,
                                                                                   node_eventsource):
    a, b = two
    ollama.script(chunks=WORDS, delay=0.05)
    response = requests.post(a.url + "/chat/", json={"prompt": "count", "stream": True}, headers=a.auth,
                             stream=True, timeout=10)
    _, start = next(sse_events(response))
    response.close()  # the generation carries on; the EventSource client follows it from the start
    token = a.auth["Authorization"].split(" ", 1)[1]
    run = subprocess.run([node_eventsource, str(NODE_DIR / "resume.mjs"), stream_url(a, start), b.url, token, "3"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert not out.get("timeout"), out
    status, content = wait_final(app, start["message_id"])
    assert status == "complete" and "".join(out["tokens"]) == content == REPLY
    check_ids([("", "0")] + list(zip(out["tokens"], out["ids"], strict=True)))
    requests_made = out["requests"]
    first, resumed, last = requests_made[0], requests_made[1], requests_made[-1]
    assert first["url"].startswith(a.url) and first["lastEventId"] is None and first["status"] == 200
    assert resumed["url"].startswith(b.url) and resumed["status"] == 200
    assert resumed["lastEventId"] == out["ids"][2]  # the cut came after the third token
    assert last["lastEventId"] == str(len(REPLY)) and last["status"] == 204 and last["type"] is None
    assert out["final"]["status"] == "complete" and ["done", str(len(REPLY))] in out["events"]


def test_page_stream_ids_resume_and_204(two, app, ollama):
    """Pages: `html` snapshots are always the whole text (ids: the offset they rendered); a reconnect
    starts with a full snapshot; a reconnect at the end of a finished answer is 204."""
    a, _ = two
    session, _ = page_sign_in(a.url, "alice", PASSWORD)
    ollama.script(chunks=WORDS, delay=0.02)
    response = requests.post(a.url + "/chat/", json={"prompt": "count", "stream": True}, headers=a.auth,
                             timeout=10)
    start = next(data for name, data in sse_events_text(response.text) if name == "start")
    url = f"{a.url}/c/{start['conversation_id']}/m/{start['message_id']}/events"
    body = session.get(url, headers={"Last-Event-ID": "12"}, timeout=10).text
    assert "retry: 2000\nid: 12\nevent: item" in body
    html_ids = [int(i) for i in re.findall(r"id: (\d+)\nevent: html", body)]
    assert html_ids and html_ids[-1] == len(REPLY)  # a full snapshot, even though the client had 12
    assert f"id: {len(REPLY)}\nevent: done" in body
    end = session.get(url, headers={"Last-Event-ID": str(len(REPLY))}, timeout=10)
    assert end.status_code == 204 and not end.content and "Content-Type" not in end.headers


def sse_events_text(body):
    for frame in body.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            yield lines["event"], json.loads(lines["data"])


# ---- tokens pushed across workers (PostgreSQL LISTEN/NOTIFY) -----------------------------------------

LONG = [f"t{n} " for n in range(60)]  # 60 tokens 50 ms apart: 3 s at the model


def test_follower_on_another_worker_gets_tokens_pushed(two, app, ollama):
    """Polling the row every 0.3 s could show at most ~10 steps of a 3 s answer; pushed, the follower
    sees the generating worker's ~25 ms batches."""
    a, b = two
    ollama.script(chunks=LONG, delay=0.05)
    response = requests.post(a.url + "/chat/", json={"prompt": "count", "stream": True}, headers=a.auth,
                             stream=True, timeout=10)
    _, start = next(sse_events(response))
    response.close()
    follower = requests.get(stream_url(b, start), headers=b.auth, stream=True, timeout=10)
    events = list(sse_events(follower))
    tokens = [data["text"] for name, data in events if name == "token"]
    assert events[-1][0] == "done" and "".join(tokens) == "".join(LONG)
    assert len(tokens) > 25, len(tokens)


def test_followers_elsewhere_do_not_poll_the_database(two, app, ollama, monkeypatch):
    """Four followers in this process (another worker, as far as the generating gunicorn knows) with
    push on: each reads the row a few times (to start, to fill a gap, to end), not every 0.3 s."""
    a, _ = two
    from webapp import push
    from webapp.service import turns
    reads = []
    real = turns._fresh_message
    monkeypatch.setattr(turns, "_fresh_message", lambda message_id: reads.append(message_id) or real(message_id))
    hub = push.start(app)
    try:
        time.sleep(0.5)  # the hub's LISTEN is in place
        ollama.script(chunks=LONG, delay=0.05)
        response = requests.post(a.url + "/chat/", json={"prompt": "count", "stream": True}, headers=a.auth,
                                 stream=True, timeout=10)
        _, start = next(sse_events(response))
        response.close()
        results = [[] for _ in range(4)]

        def follow(into):
            with app.app_context():
                for kind, value in turns.follow(start["message_id"], poll=0.3):
                    if kind == "token":
                        into.append(value)
        threads = [threading.Thread(target=follow, args=(into,)) for into in results]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        for tokens in results:
            assert "".join(tokens) == "".join(LONG)
            assert len(tokens) > 25, len(tokens)
        # Polling: >= 10 reads per follower over 3 s. Pushed: start + end + at most a gap or two.
        assert len(reads) <= 4 * 5, len(reads)
    finally:
        hub.stop()
        app.extensions.pop("push", None)


def test_a_notification_never_exceeds_8000_bytes_and_says_read_the_row_instead():
    from webapp.push import PAYLOAD_MAX, fit
    small, big = [1, 0, "hello"], [2, 10, "é" * 5000]  # 10,000 bytes of UTF-8
    body = fit({"d": [small, big], "e": [3]})
    assert len(body.encode()) < PAYLOAD_MAX
    assert json.loads(body) == {"d": [[1, 0, "hello"], [2, 10, None]], "e": [3]}


def test_a_follower_takes_exactly_what_continues_its_offset():
    from webapp.push import Subscription

    class Hub:
        def unsubscribe(self, subscription):
            pass
    inbox = Subscription(Hub(), 1)
    inbox.put(0, "abc")
    inbox.put(3, "def")
    pushed = inbox.take(2, timeout=0)
    assert (pushed.text, pushed.gap, pushed.end) == ("cdef", False, False)
    inbox.put(9, "jkl")  # 6..9 was missed: a gap, kept for after the row read
    pushed = inbox.take(6, timeout=0)
    assert (pushed.text, pushed.gap) == ("", True)
    inbox.put(12, "mn")
    pushed = inbox.take(9, timeout=0)  # the row gave 6..9: the kept piece continues it
    assert (pushed.text, pushed.gap) == ("jklmn", False)
    inbox.put(14, None)  # too big to send: read the row
    inbox.end()
    pushed = inbox.take(14, timeout=0)
    assert pushed.gap and pushed.end
