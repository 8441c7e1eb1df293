"""Streaming through real HTTP against gunicorn: disconnects, re-attach, Stop, failures, other workers."""
import time

import pytest
import requests

from helpers import PASSWORD, both_databases, make_user
from live import login, sse_events

pytestmark = both_databases

REPLY = "one two three four five six seven eight nine ten eleven twelve"


@pytest.fixture
def live(servers, app):
    make_user(app)
    server = servers()
    server.auth = login(server.url, "alice", PASSWORD)
    return server


def message_row(app, message_id):
    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        message = db.session.get(Message, message_id)
        db.session.expunge(message)
        return message


def wait_for_status(app, message_id, statuses, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = message_row(app, message_id)
        if message.status in statuses:
            return message
        time.sleep(0.05)
    raise AssertionError(f"message {message_id} stayed {message.status}")


def start_stream(server, prompt="count", **extra):
    response = requests.post(server.url + "/chat/", json={"prompt": prompt, "stream": True, **extra},
                             headers=server.auth, stream=True, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response, sse_events(response)


def test_stream_events_and_final_object_match_non_stream(live, ollama):
    ollama.script(reply=REPLY, delay=0.05)  # tokens further apart than the 30 ms a follower coalesces
    response, events = start_stream(live)
    events = list(events)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done"
    assert names.count("token") >= 5  # arrives in several steps
    start, final = events[0][1], events[-1][1]
    assert start["message_id"] == final["message_id"] and start["conversation_id"] == final["conversation_id"]
    assert "".join(data["text"] for name, data in events if name == "token") == REPLY
    plain = requests.post(live.url + "/chat/", json={"prompt": "count"}, headers=live.auth, timeout=10).json()
    assert set(final) - {"user_message_id"} == set(plain) - {"user_message_id"}
    assert final["response"] == REPLY and final["status"] == "complete"
    assert final["usage"]["completion_tokens"] == 12


def test_disconnect_then_reattach_gets_whole_answer(live, app, ollama):
    ollama.script(reply=REPLY, delay=0.1)
    response, events = start_stream(live)
    _, start = next(events)
    assert next(events)[0] == "token"
    response.close()  # the client goes away mid-answer
    reattach = requests.get(f"{live.url}/conversations/{start['conversation_id']}/messages/"
                            f"{start['message_id']}/stream", headers=live.auth, stream=True, timeout=10)
    events = list(sse_events(reattach))
    assert "".join(d["text"] for n, d in events if n == "token") == REPLY
    assert events[-1][0] == "done" and events[-1][1]["response"] == REPLY
    assert message_row(app, start["message_id"]).status == "complete"


def test_generation_finishes_after_client_is_gone(live, app, ollama):
    ollama.script(reply=REPLY, delay=0.05)
    response, events = start_stream(live)
    _, start = next(events)
    response.close()
    message = wait_for_status(app, start["message_id"], {"complete"})
    assert message.content == REPLY
    assert message.completion_tokens == 12


def test_stop_closes_upstream_and_saves_cancelled(live, app, ollama):
    ollama.script(reply=REPLY, delay=0.3)
    response, events = start_stream(live)
    _, start = next(events)
    assert next(events)[0] == "token"
    stopped_at = time.monotonic()
    stop = requests.post(f"{live.url}/conversations/{start['conversation_id']}/stop", headers=live.auth,
                         timeout=10)
    assert stop.status_code == 200
    event = ollama.wait_for_event("client_closed", timeout=2.0)
    assert event is not None and event[1] - stopped_at < 1.0
    assert stop.json()["status"] == "cancelled"
    rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "cancelled"
    message = message_row(app, start["message_id"])
    assert message.status == "cancelled" and message.content and REPLY.startswith(message.content)
    assert len(message.content) < len(REPLY)


@pytest.mark.parametrize("script, code, partial", [
    (dict(fail="status", status=500), "upstream_error", ""),
    (dict(fail="midstream", fail_after=3, error="runner died"), "upstream_error", "one two three "),
    (dict(fail="stall", fail_after=2, stall=6.0), "llm_timeout", "one two "),
    (dict(fail="cut", fail_after=2), "upstream_error", "one two "),
])
def test_failures_become_error_events(live, app, ollama, script, code, partial):
    ollama.script(reply=REPLY, **script)
    response, events = start_stream(live)
    events = list(events)
    name, final = events[-1]
    assert name == "failed"  # not "error": EventSource fires its own "error" on connection trouble
    assert final["status"] == "error" and final["error"]["code"] == code
    assert final["response"] == partial
    message = message_row(app, final["message_id"])
    assert (message.status, message.error_code, message.content) == ("error", code, partial)


def test_second_turn_in_same_conversation_is_409_other_conversations_run(live, ollama):
    ollama.script(reply=REPLY, delay=0.1)
    first, events = start_stream(live)
    _, start = next(events)
    busy = requests.post(live.url + "/chat/", json={"prompt": "again", "conversation_id": start["conversation_id"]},
                         headers=live.auth, timeout=10)
    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "conversation_busy"
    other, other_events = start_stream(live, "a parallel chat")
    other_events = list(other_events)
    assert other_events[-1][0] == "done"
    assert list(events)[-1][1]["response"] == REPLY  # the first one was not disturbed


def test_reattach_and_stop_from_another_process(servers, app, ollama):
    """Two separate gunicorn servers over one database stand for two workers or replicas."""
    make_user(app)
    a, b = servers(), servers()
    auth = login(a.url, "alice", PASSWORD)
    ollama.script(reply=REPLY, delay=0.15)
    a.auth = auth
    response, events = start_stream(a)
    _, start = next(events)
    next(events)
    response.close()
    url = f"/conversations/{start['conversation_id']}/messages/{start['message_id']}/stream"
    replay = requests.get(b.url + url, headers=auth, stream=True, timeout=10)
    replay_events = sse_events(replay)
    assert next(replay_events)[0] == "start"
    name, first = next(replay_events)
    assert name == "token" and first["text"].startswith("one")
    stopped_at = time.monotonic()
    stop = requests.post(f"{b.url}/conversations/{start['conversation_id']}/stop", headers=auth, timeout=10)
    assert stop.status_code == 200 and stop.json()["status"] == "cancelled"
    event = ollama.wait_for_event("client_closed", timeout=2.0)
    assert event is not None and event[1] - stopped_at < 1.0
    rest = list(replay_events)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "cancelled"


def crash_mid_answer(servers, app, ollama, **survivor_env):
    """Start an answer on one server, SIGKILL it mid-answer; return the other server, auth and ids."""
    make_user(app)
    doomed, survivor = servers(), servers(**survivor_env)
    auth = login(doomed.url, "alice", PASSWORD)
    doomed.auth = auth
    ollama.script(reply=REPLY, delay=0.2)
    response, events = start_stream(doomed)
    _, start = next(events)
    next(events)
    time.sleep(0.3)  # let a flush reach the database
    doomed.kill()
    return survivor, auth, start


def test_worker_crash_is_detected_as_interrupted_and_can_be_retried(servers, app, ollama):
    # No sweeper on the survivor: its reads must find the orphan.
    survivor, auth, start = crash_mid_answer(servers, app, ollama, ORPHAN_SWEEP_SECONDS=0)
    time.sleep(2.0)  # past STALE_AFTER_SECONDS (1.5 s)
    single = requests.get(f"{survivor.url}/conversations/{start['conversation_id']}/messages/"
                          f"{start['message_id']}", headers=auth, timeout=10).json()
    assert single["status"] == "interrupted"  # whichever read comes first finds the orphan
    listed = requests.get(f"{survivor.url}/conversations", headers=auth, timeout=10).json()["conversations"]
    assert listed[0]["id"] == start["conversation_id"] and listed[0]["generating"] is False
    conversation = requests.get(f"{survivor.url}/conversations/{start['conversation_id']}", headers=auth,
                                timeout=10).json()
    answer = conversation["messages"][-1]
    assert answer["status"] == "interrupted" and answer["content"].startswith("one")
    assert conversation["generating"] is False
    ollama.script(reply="fresh answer")
    retry = requests.post(f"{survivor.url}/conversations/{start['conversation_id']}/regenerate", headers=auth,
                          timeout=10)
    assert retry.status_code == 200 and retry.json()["response"] == "fresh answer"
    messages = requests.get(f"{survivor.url}/conversations/{start['conversation_id']}", headers=auth,
                            timeout=10).json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]


def test_orphans_are_swept_even_when_nobody_looks(servers, app, ollama):
    """A crashed worker's answer becomes 'interrupted' in the database by itself: another worker's
    sweeper finds the stopped heartbeat, keeps the partial text and frees the conversation."""
    survivor, _, start = crash_mid_answer(servers, app, ollama, ORPHAN_SWEEP_SECONDS=0.5)
    message = wait_for_status(app, start["message_id"], {"interrupted"}, timeout=6.0)  # no request made
    assert message.content.startswith("one") and message.error_code == "interrupted"
    from webapp.extensions import db
    from webapp.models import Conversation
    with app.app_context():
        assert db.session.get(Conversation, start["conversation_id"]).active_message_id is None
    # The sweeper writes its line after its commit: the status can be seen before the line is.
    deadline = time.monotonic() + 5
    while "orphaned by a dead worker" not in survivor.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "orphaned by a dead worker" in survivor.log_text()


def test_graceful_worker_exit_saves_running_answers_as_interrupted(servers, app, ollama):
    make_user(app)
    server = servers()
    server.auth = login(server.url, "alice", PASSWORD)
    ollama.script(reply=REPLY, delay=0.2)
    response, events = start_stream(server)
    _, start = next(events)
    next(events)
    response.close()  # nobody is watching; the generation carries on in the worker
    stopped_at = time.monotonic()
    server.stop()  # SIGTERM: a deploy or restart
    message = wait_for_status(app, start["message_id"], {"interrupted"}, timeout=5.0)
    assert time.monotonic() - stopped_at < 5.0
    assert message.content.startswith("one") and len(message.content) < len(REPLY)
    assert "restarted" in message.error


def test_stop_while_the_model_is_loading(servers, app, ollama):
    make_user(app)
    server = servers(OLLAMA_LOAD_TIMEOUT=30)
    server.auth = login(server.url, "alice", PASSWORD)
    ollama.script(reply=REPLY, fail="headers_stall", stall=20.0)
    response, events = start_stream(server)
    _, start = next(events)
    time.sleep(0.5)
    stopped_at = time.monotonic()
    stop = requests.post(f"{server.url}/conversations/{start['conversation_id']}/stop", headers=server.auth,
                         timeout=10)
    assert stop.status_code == 200 and stop.json()["status"] == "cancelled"
    event = ollama.wait_for_event("client_closed", timeout=2.0)
    assert event is not None and event[1] - stopped_at < 1.0
    assert list(events)[-1][1]["status"] == "cancelled"


def test_a_burst_of_tokens_sends_the_first_one_at_once(live, ollama):
    """A model that sends a whole answer at once (a cached prompt, a small fast model): the first token
    goes out in an event of its own, ahead of the tokens already buffered behind it."""
    ollama.script(reply=REPLY)  # no delay: all twelve tokens back to back
    _, events = start_stream(live)
    tokens = [data["text"] for name, data in events if name == "token"]
    assert "".join(tokens) == REPLY
    assert tokens[0] == ollama.chunks_for({**ollama._script})[0]
