"""Safe retries: an `Idempotency-Key` on POST /chat/ and POST /v1/chat/completions makes a retry
return (or re-attach to) the first attempt's answer instead of starting a second generation. Against
gunicorn with real clients (requests, the `openai` SDK), on PostgreSQL and SQLite: a stream cut
mid-answer and retried, a whole answer retried after a timeout, the key with another body (422), two
requests racing with one key, bad keys (400), keys per person; and the race itself through the
service, with the winner held inside its transaction."""
import threading
import time
import uuid
from datetime import timedelta

import openai
import pytest
import requests

from helpers import PASSWORD, both_databases, login_token, make_user
from live import login, sse_events

pytestmark = both_databases
WORDS = [f"w{n} " for n in range(40)]
REPLY = "".join(WORDS)


def new_key():
    return str(uuid.uuid4())


def saved(app):
    """Every conversation and message in the database: [(conversation id, [(role, status, content)])]."""
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import Conversation, Message
    with app.app_context():
        rows = db.session.execute(select(Conversation.id, Message.role, Message.status, Message.content)
                                  .join(Message, Message.conversation_id == Conversation.id)
                                  .order_by(Conversation.id, Message.id)).all()
        db.session.rollback()
    found = {}
    for conversation_id, role, status, content in rows:
        found.setdefault(conversation_id, []).append((role, status, content))
    return list(found.items())


def wait_saved(app, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = saved(app)
        if predicate(rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"not saved as expected: {saved(app)}")


def all_final(rows):
    return rows and all(status not in ("queued", "pending", "streaming") for _, messages in rows
                        for _, status, _ in messages)


def one_turn(rows, content=REPLY):
    """Exactly one conversation holding exactly one prompt and its complete answer."""
    return (len(rows) == 1 and [role for role, _, _ in rows[0][1]] == ["user", "assistant"]
            and rows[0][1][1][1:] == ("complete", content))


def key_rows(app):
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import IdempotencyKey
    with app.app_context():
        rows = db.session.execute(select(IdempotencyKey.user_id, IdempotencyKey.key, IdempotencyKey.message_id)).all()
        db.session.rollback()
    return rows


@pytest.fixture
def live(servers, app):
    """One gunicorn (two workers) over the test database; alice and bob signed in."""
    make_user(app)
    make_user(app, "bob")
    server = servers(workers=2)
    server.auth = login(server.url, "alice", PASSWORD)
    server.bob = login(server.url, "bob", PASSWORD)
    return server


def post(server, body, key, auth=None, **kwargs):
    headers = {**(auth or server.auth), **({"Idempotency-Key": key} if key is not None else {})}
    return requests.post(server.url + "/chat/", json=body, headers={**headers, **kwargs.pop("headers", {})},
                         timeout=kwargs.pop("timeout", 20), **kwargs)


# ---- POST /chat/ ------------------------------------------------------------------------------------

def test_a_stream_cut_mid_answer_and_retried_with_its_key_replays_the_same_answer(live, app, ollama):
    ollama.script(chunks=WORDS, delay=0.05)
    key, body = new_key(), {"prompt": "count", "stream": True}
    first = post(live, body, key, stream=True)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    events = sse_events(first)
    name, start = next(events)
    got = []
    for name, data in events:
        if name == "token":
            got.append(data["text"])
        if len(got) == 3:
            break
    first.close()  # the connection drops mid-answer; the server goes on generating
    assert len(ollama.chat_requests) == 1

    retry = post(live, body, key, stream=True)
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    replay = list(sse_events(retry))
    assert replay[0] == ("start", {**start, "request_id": replay[0][1]["request_id"]})  # the same ids
    assert replay[-1][0] == "done" and replay[-1][1]["message_id"] == start["message_id"]
    joined = "".join(data["text"] for name, data in replay if name == "token")
    rows = wait_saved(app, all_final)
    assert one_turn(rows) and joined == REPLY  # replayed from the start, equal to the saved answer
    assert len(ollama.chat_requests) == 1  # no second generation

    # With the last id it got, the retry goes on right after it, as every stream does.
    offset = len("".join(got))
    resumed = post(live, body, key, stream=True, headers={"Last-Event-ID": str(offset)})
    rest = list(sse_events(resumed))
    assert "".join(data["text"] for name, data in rest if name == "token") == REPLY[offset:]
    whole = post(live, {"prompt": "count"}, key)  # `stream` is how the answer comes, not which answer
    assert whole.status_code == 200 and whole.json()["message_id"] == start["message_id"]
    done = post(live, body, key, stream=True, headers={"Last-Event-ID": str(len(REPLY))})
    assert done.status_code == 204 and not done.content and done.headers["Idempotent-Replayed"] == "true"
    assert one_turn(saved(app)) and len(ollama.chat_requests) == 1


def test_a_whole_answer_retried_after_a_timeout_returns_the_first_ids(live, app, ollama):
    ollama.script(chunks=WORDS, delay=0.05)  # 2 s at the model
    key, body = new_key(), {"prompt": "count"}
    with pytest.raises(requests.ReadTimeout):
        post(live, body, key, timeout=(5, 0.5))
    retry = post(live, body, key)  # waits for the first attempt's answer
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    answer = retry.json()
    assert answer["response"] == REPLY and answer["status"] == "complete"
    again = post(live, body, key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert {k: again.json()[k] for k in ("conversation_id", "message_id", "user_message_id", "response")} == {
        k: answer[k] for k in ("conversation_id", "message_id", "user_message_id", "response")}
    rows = saved(app)
    assert one_turn(rows) and rows[0][0] == answer["conversation_id"] and len(ollama.chat_requests) == 1

    # The same key with another request: 422, and nothing new is saved or generated.
    for other in ({"prompt": "count!"}, {"prompt": "count", "options": {"temperature": 0.5}},
                  {"prompt": "count", "conversation_id": answer["conversation_id"]}):
        refused = post(live, other, key)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "idempotency_key_reused"
        assert refused.json()["error"]["field"] == "Idempotency-Key"
    assert saved(app) == rows and len(ollama.chat_requests) == 1

    # Keys are per person: bob's request with alice's key is bob's own new answer.
    bobs = post(live, body, key, auth=live.bob)
    assert bobs.status_code == 200 and "Idempotent-Replayed" not in bobs.headers
    assert bobs.json()["message_id"] != answer["message_id"] and len(ollama.chat_requests) == 2
    assert post(live, body, key, auth=live.bob).json()["message_id"] == bobs.json()["message_id"]
    assert len(saved(app)) == 2 and len(key_rows(app)) == 2


def test_requests_racing_with_one_key_make_one_answer(live, app, ollama):
    ollama.script(chunks=WORDS[:10], delay=0.05)
    key, body, count = new_key(), {"prompt": "race"}, 4
    barrier, answers = threading.Barrier(count), [None] * count

    def send(index):
        barrier.wait()
        answers[index] = post(live, body, key)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [response.status_code for response in answers] == [200] * count, [r.text for r in answers]
    assert len({response.json()["message_id"] for response in answers}) == 1
    assert sum("Idempotent-Replayed" not in response.headers for response in answers) == 1
    assert one_turn(saved(app), "".join(WORDS[:10])) and len(ollama.chat_requests) == 1


def test_bad_keys_are_refused_with_400_before_anything_starts(live, app, ollama, client):
    for bad in ("x" * 256, ""):
        refused = post(live, {"prompt": "hi"}, bad)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "invalid_idempotency_key"
        v1 = requests.post(live.url + "/v1/chat/completions", headers={**live.auth, "Idempotency-Key": bad},
                           json={"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert v1.status_code == 400 and v1.json()["error"]["code"] == "invalid_idempotency_key"
        assert v1.json()["error"]["type"] == "invalid_request_error"
    # Through the app itself: what a proxy might pass on (control characters, non-ASCII).
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    for bad in ("a\tb", "caf\u00e9", "\x01", '"a\x7fb"'):
        refused = client.post("/chat/", json={"prompt": "hi"}, headers={**auth, "Idempotency-Key": bad})
        assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "invalid_idempotency_key"
    assert saved(app) == [] and ollama.chat_requests == []


# ---- /v1/chat/completions, with the openai SDK --------------------------------------------------------

@pytest.fixture
def sdk_key(live):
    made = requests.post(live.url + "/auth/keys", json={"name": "sdk"}, headers=live.auth, timeout=10)
    assert made.status_code == 201, made.text
    return made.json()["key"]


def test_v1_retries_with_a_key_reattach_instead_of_cancelling(live, app, ollama, sdk_key):
    ollama.script(chunks=WORDS, delay=0.05)
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key=sdk_key, max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "count"}]

    # A stream dropped after a few chunks: with a key the answer is not cancelled, and the retry
    # replays it whole, with the same completion id.
    key = {"Idempotency-Key": new_key()}
    stream = sdk.chat.completions.create(model="tinyllama", messages=messages, stream=True, extra_headers=key)
    first = [next(stream) for _ in range(4)]
    stream.close()
    raw = sdk.chat.completions.with_raw_response.create(model="tinyllama", messages=messages, stream=True,
                                                        extra_headers=key)
    assert raw.headers["Idempotent-Replayed"] == "true"
    chunks = list(raw.parse())
    assert {chunk.id for chunk in first + chunks} == {first[0].id}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    rows = wait_saved(app, all_final)
    assert one_turn(rows) and len(ollama.chat_requests) == 1

    # A whole answer whose client gave up (timeout): the retry gets it, not a cancelled one.
    key = {"Idempotency-Key": new_key()}
    impatient = openai.OpenAI(base_url=live.url + "/v1", api_key=sdk_key, max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tinyllama", messages=messages, extra_headers=key)
    time.sleep(1.0)  # longer than the disconnect check: a call without a key would be cancelled by now
    raw = sdk.chat.completions.with_raw_response.create(model="tinyllama", messages=messages, extra_headers=key)
    completion = raw.parse()
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert completion.choices[0].message.content == REPLY and completion.choices[0].finish_reason == "stop"
    rows = saved(app)
    assert len(rows) == 2 and rows[1][1][1] == ("assistant", "complete", REPLY)
    assert completion.id.startswith("chatcmpl-") and len(ollama.chat_requests) == 2
    assert sdk.chat.completions.create(model="tinyllama", messages=messages, extra_headers=key).id == completion.id

    # The key with other messages: 422, which the SDK raises as its typed error.
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        sdk.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": "other"}],
                                    extra_headers=key)
    assert caught.value.code == "idempotency_key_reused" and caught.value.status_code == 422
    # One key belongs to one door: the same key on /chat/ is another request.
    assert post(live, {"prompt": "count"}, key["Idempotency-Key"]).status_code == 422
    assert len(saved(app)) == 2 and len(ollama.chat_requests) == 2


# ---- the service itself -----------------------------------------------------------------------------

def test_the_race_for_one_key_is_decided_by_the_primary_key(app, ollama, monkeypatch):
    """The winner is held inside its transaction, after writing its key; the loser has looked for the
    key and found none, so its next step is writing the same key: it must wait or fail, lose (its
    transaction rolled back whole) and re-attach to the winner's answer."""
    from webapp import service
    from webapp.auth.accounts import find_user
    from webapp.service import idempotency, turns
    make_user(app)
    ollama.script(chunks=WORDS[:5], delay=0.02)
    inside, release, loser_looked, lost = threading.Event(), threading.Event(), threading.Event(), []
    real_take_turn, real_claim, real_find = turns.take_turn, idempotency.claim, idempotency.find

    def held(user):  # runs right after the key's row is written, in the same transaction
        if threading.current_thread().name == "winner":
            inside.set()
            release.wait(20)
        return real_take_turn(user)

    def find(*args):
        found = real_find(*args)
        if threading.current_thread().name == "loser" and found is None:
            loser_looked.set()
        return found

    def claim(*args):
        try:
            return real_claim(*args)
        except idempotency.KeyTaken:
            lost.append(threading.current_thread().name)
            raise

    monkeypatch.setattr(turns, "take_turn", held)
    monkeypatch.setattr(idempotency, "find", find)
    monkeypatch.setattr(idempotency, "claim", claim)
    results = {}

    def run():
        with app.app_context():
            turn = service.start_turn(find_user("alice"), "hello", idempotency_key="k-1")
            results[threading.current_thread().name] = (turn.message_id, turn.conversation_id, turn.replayed)

    winner = threading.Thread(target=run, name="winner")
    winner.start()
    assert inside.wait(10)
    loser = threading.Thread(target=run, name="loser")
    loser.start()
    assert loser_looked.wait(10)  # the winner's row is not committed: the loser saw no key
    time.sleep(0.3)  # let it reach the INSERT and wait there (PostgreSQL) or for the write lock (SQLite)
    assert not results  # it cannot get past the winner's transaction
    release.set()
    winner.join(20)
    loser.join(20)
    assert lost == ["loser"]
    assert results["winner"][2] is False and results["loser"] == (*results["winner"][:2], True)
    rows = wait_saved(app, all_final)
    assert one_turn(rows, "".join(WORDS[:5]))


def test_keys_expire_spellings_agree_and_a_deleted_answer_frees_its_key(app, client, auth, ollama):
    from sqlalchemy import update

    from webapp.extensions import db
    from webapp.models import IdempotencyKey, utcnow
    first = client.post("/chat/", json={"prompt": "hi"}, headers={**auth, "Idempotency-Key": "abc"})
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    # The draft's quoted sf-string and the bare value are one key.
    quoted = client.post("/chat/", json={"prompt": "hi"}, headers={**auth, "Idempotency-Key": '"abc"'})
    assert quoted.headers["Idempotent-Replayed"] == "true"
    assert quoted.get_json()["message_id"] == first.get_json()["message_id"]

    # Older than a day, a key is forgotten: the same request is a new one (and the old row goes).
    with app.app_context():
        db.session.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=25)))
        db.session.commit()
    later = client.post("/chat/", json={"prompt": "hi"}, headers={**auth, "Idempotency-Key": "abc"})
    assert later.status_code == 200 and "Idempotent-Replayed" not in later.headers
    assert later.get_json()["message_id"] != first.get_json()["message_id"]
    assert [row.message_id for row in key_rows(app)] == [later.get_json()["message_id"]]

    # Deleting the conversation deletes its answers' keys: nothing of it is left behind.
    conversation = later.get_json()["conversation_id"]
    assert client.delete(f"/conversations/{conversation}", headers=auth).status_code == 204
    assert key_rows(app) == []


def test_a_retry_after_the_answer_was_regenerated_replays_the_new_answer(app, client, auth, ollama):
    """Regenerate replaces the answer a key opened: a late retry with that key gets the answer that
    took its place, and adds nothing to the conversation."""
    first = client.post("/chat/", json={"prompt": "hi"}, headers={**auth, "Idempotency-Key": "regen-1"}).get_json()
    conversation = first["conversation_id"]
    again = client.post(f"/conversations/{conversation}/regenerate", json={}, headers=auth)
    assert again.status_code == 200, again.get_json()
    new_id = again.get_json()["message_id"]
    assert new_id != first["message_id"]
    retry = client.post("/chat/", json={"prompt": "hi"}, headers={**auth, "Idempotency-Key": "regen-1"})
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.get_json()["message_id"] == new_id
    messages = client.get(f"/conversations/{conversation}", headers=auth).get_json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["id"] == new_id
