"""/v1, OpenAI's API, through the test client: every chat.completions request field is mapped,
ignored or refused (one test per row of the README's table), OpenAI's error shape and statuses, and
how calls are stored (a conversation marked "api"; only the messages not stored already)."""
import json
import threading

import pytest

from helpers import both_databases

pytestmark = both_databases

URL = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def key(client, auth):
    return {"Authorization": "Bearer " + client.post("/auth/keys", json={"name": "t"}, headers=auth).get_json()["key"]}


def ask(client, key, **body):
    return client.post(URL, json={"model": "tinyllama", "messages": HELLO, **body}, headers=key)


def conversations(app):
    with app.app_context():
        from sqlalchemy import select

        from webapp.extensions import db
        from webapp.models import Conversation, Message
        result = []
        for conversation in db.session.scalars(select(Conversation).order_by(Conversation.id)):
            rows = db.session.scalars(select(Message).where(Message.conversation_id == conversation.id)
                                      .order_by(Message.id)).all()
            result.append((conversation.source, conversation.system_prompt,
                           [(m.role, m.content, m.status) for m in rows]))
        return result


# ---- the README's field table: one test per row --------------------------------------------------

MAPPED = [  # field, value, what the model server receives (in Ollama's options)
    ("temperature", 0.3, {"temperature": 0.3}),
    ("top_p", 0.5, {"top_p": 0.5}),
    ("seed", 42, {"seed": 42}),
    ("max_tokens", 7, {"num_predict": 7}),
    ("max_completion_tokens", 9, {"num_predict": 9}),
    ("stop", ["\n\n", "END"], {"stop": ["\n\n", "END"]}),
    ("frequency_penalty", 0.5, {"frequency_penalty": 0.5}),
    ("presence_penalty", -0.5, {"presence_penalty": -0.5}),
]


@pytest.mark.parametrize("field,value,option", MAPPED, ids=[row[0] for row in MAPPED])
def test_mapped_field_reaches_the_model_as_an_ollama_option(client, key, ollama, field, value, option):
    response = ask(client, key, **{field: value})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert ollama.chat_requests[-1]["options"].items() >= option.items()


def test_mapped_stop_as_one_string(client, key, ollama):
    assert ask(client, key, stop="END").status_code == 200
    assert ollama.chat_requests[-1]["options"]["stop"] == ["END"]


def test_mapped_model_messages_and_n_1(client, key, ollama):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}]}]
    response = ask(client, key, messages=messages, n=1, model="llama3.2")
    assert response.status_code == 200
    sent = ollama.chat_requests[-1]
    assert sent["model"] == "llama3.2"
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and you?"}]
    body = response.get_json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == \
        "Hello from the fake model."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0


def test_mapped_developer_role_is_a_system_message(client, key, ollama):
    ask(client, key, messages=[{"role": "developer", "content": "rules"}, *HELLO])
    assert ollama.chat_requests[-1]["messages"][0] == {"role": "system", "content": "rules"}


def test_mapped_max_tokens_ends_with_finish_reason_length(client, key):
    body = ask(client, key, max_tokens=2).get_json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2


def test_mapped_stream_and_stream_options_include_usage(client, key):
    text = ask(client, key, stream=True, stream_options={"include_usage": True}).get_data(as_text=True)
    frames = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        "Hello from the fake model."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    plain = ask(client, key, stream=True).get_data(as_text=True)
    assert '"usage"' not in plain and plain.endswith("data: [DONE]\n\n")


def test_mapped_metadata_conversation_id_continues_that_conversation(app, client, key):
    first = ask(client, key)
    cid = first.headers["X-Conversation-Id"]
    messages = [*HELLO, {"role": "assistant", "content": "Hello from the fake model."},
                {"role": "user", "content": "more"}]
    again = ask(client, key, messages=messages, metadata={"conversation_id": cid, "other": "ignored"})
    assert again.headers["X-Conversation-Id"] == cid
    assert [len(c[2]) for c in conversations(app)] == [4]


IGNORED = [("user", "user-1234"), ("safety_identifier", "abc"), ("prompt_cache_key", "k"), ("store", True),
           ("service_tier", "auto"), ("reasoning_effort", "low"), ("verbosity", "low")]


@pytest.mark.parametrize("field,value", IGNORED, ids=[row[0] for row in IGNORED])
def test_ignored_field_is_accepted_and_not_sent(client, key, ollama, field, value):
    response = ask(client, key, **{field: value})
    assert response.status_code == 200, response.get_data(as_text=True)
    sent = ollama.chat_requests[-1]
    assert field not in sent and field not in (sent.get("options") or {})


REFUSED = [("n", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
           ("parallel_tool_calls", True), ("functions", [{"name": "f"}]), ("function_call", "auto"),
           ("logprobs", True), ("top_logprobs", 2), ("logit_bias", {"50256": -100}),
           ("response_format", {"type": "json_object"}), ("audio", {"voice": "alloy", "format": "wav"}),
           ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
           ("web_search_options", {}), ("no_such_field", 1)]


@pytest.mark.parametrize("field,value", REFUSED, ids=[row[0] for row in REFUSED])
def test_refused_field_is_a_400_naming_it(client, key, ollama, field, value):
    response = ask(client, key, **{field: value})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field and field in error["message"]
    assert ollama.chat_requests == []


def test_refused_fields_with_their_off_value_are_accepted(client, key):
    assert ask(client, key, logprobs=False, tools=None, logit_bias={}, response_format={"type": "text"},
               modalities=["text"], n=1).status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"model": ""}, "model"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "yes"}, "stream"),
], ids=["tool-message", "image", "last-not-user", "no-messages", "no-model", "temperature", "max_tokens",
        "stop", "stream_options-without-stream", "stream-type"])
def test_malformed_requests_are_400_invalid_request_error(client, key, body, param):
    response = client.post(URL, json={"model": "tinyllama", "messages": HELLO, **body}, headers=key)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == param


# ---- errors in OpenAI's shape ------------------------------------------------------------------------

def shape(response):
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    return error


def test_errors_have_openais_shape_and_statuses(client, key, auth):
    assert shape(client.get("/v1/models"))["code"] == "invalid_api_key"
    bad = client.post(URL, json={}, headers={"Authorization": "Bearer llmk_nope"})
    assert bad.status_code == 401 and shape(bad)["code"] == "invalid_api_key"
    missing = ask(client, key, model="gpt-4o")
    assert missing.status_code == 404 and shape(missing) == {**shape(missing), "code": "model_not_found",
                                                             "param": "model"}
    assert shape(client.get("/v1/models/gpt-4o", headers=key))["code"] == "model_not_found"
    not_json = client.post(URL, data="hi", headers=key)
    assert not_json.status_code == 400 and shape(not_json)["type"] == "invalid_request_error"
    unknown = client.get("/v1/nothing-here", headers=key)
    assert unknown.status_code == 404 and shape(unknown)["type"] == "invalid_request_error"
    wrong_method = client.get(URL, headers=key)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["Allow"]
    assert shape(wrong_method)
    other = ask(client, key, metadata={"conversation_id": "999"})
    assert other.status_code == 404 and shape(other)["code"] == "conversation_not_found"


def test_the_model_server_failing_is_a_server_error(client, key, ollama):
    ollama.script(fail="status", status=500)
    response = ask(client, key)
    assert response.status_code == 502 and shape(response)["type"] == "server_error"


def test_v1_takes_the_same_model_names_as_every_door(make_app, ollama):
    """The server's list plus ALLOWED_MODELS; with the model server down, only the allow-list and
    the default model (never any name at all)."""
    from helpers import login_token, make_user
    listed = make_app(ALLOWED_MODELS=["extra-model"])
    make_user(listed)
    client = listed.test_client()
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    ask(client, auth, model="extra-model")  # allowed: it reaches the model server (which says no)
    assert any(r["model"] == "extra-model" for r in ollama.chat_requests)
    refused = ask(client, auth, model="nonesuch")
    assert refused.status_code == 404 and shape(refused)["code"] == "model_not_found"
    assert not any(r["model"] == "nonesuch" for r in ollama.chat_requests)
    down = make_app(OLLAMA_URL="http://127.0.0.1:9").test_client()
    auth = {"Authorization": f"Bearer {login_token(down)}"}
    assert shape(ask(down, auth, model="tinyllama"))["type"] == "server_error"  # the default: tried
    refused = ask(down, auth, model="llama3.2")
    assert refused.status_code == 404 and shape(refused)["code"] == "model_not_found"


def test_models_list_and_get(client, key, auth):
    for credentials in (key, auth):  # an API key or a bearer token from /auth/login
        body = client.get("/v1/models", headers=credentials).get_json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["tinyllama:latest", "llama3.2:latest"]
    assert client.get("/v1/models/tinyllama", headers=key).get_json()["id"] == "tinyllama:latest"


# ---- storage -----------------------------------------------------------------------------------------

def test_calls_are_stored_as_api_conversations_with_only_the_new_messages(app, client, key, ollama):
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "one"}]
    cid = None
    for turn in ("two", "three", None):
        response = client.post(URL, json={"model": "tinyllama", "messages": history}, headers={
            **key, **({"X-Conversation-Id": cid} if cid else {})})
        assert response.status_code == 200
        assert ollama.chat_requests[-1]["messages"] == history  # exactly the client's messages
        cid = cid or response.headers["X-Conversation-Id"]
        assert response.headers["X-Conversation-Id"] == cid
        history = history + [response.get_json()["choices"][0]["message"]]
        history = [{"role": m["role"], "content": m["content"]} for m in history]
        if turn:
            history.append({"role": "user", "content": turn})
    [(source, system, rows)] = conversations(app)
    assert source == "api" and system == "You are terse."
    assert [(role, status) for role, _, status in rows] == [("user", "complete"), ("assistant", "complete")] * 3
    assert [content for role, content, _ in rows if role == "user"] == ["one", "two", "three"]
    listed = client.get("/conversations", headers=key).get_json()["conversations"]
    assert listed[0]["source"] == "api" and listed[0]["message_count"] == 6


def test_an_edited_history_starts_a_new_conversation_and_loses_nothing(app, client, key):
    cid = ask(client, key).headers["X-Conversation-Id"]
    edited = [{"role": "user", "content": "hello?"}, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": "go on"}]
    response = client.post(URL, json={"model": "tinyllama", "messages": edited},
                           headers={**key, "X-Conversation-Id": cid})
    assert response.status_code == 200 and response.headers["X-Conversation-Id"] != cid
    assert [len(rows) for _, _, rows in conversations(app)] == [2, 4]


def test_new_messages_survive_taking_over_a_dead_workers_answer(app, client, key):
    """The conversation is held by an answer orphaned by a dead worker: the claim fails, is rolled
    back, the orphan is freed and the claim retried. The messages past the stored path (between it
    and the last) are written by that retry too, not lost with the first attempt."""
    from datetime import timedelta

    from sqlalchemy import func, select

    from webapp import answers
    from webapp.extensions import db
    from webapp.models import Conversation, Message, utcnow
    cid = ask(client, key).headers["X-Conversation-Id"]
    with app.app_context():
        _, orphan = answers.open_answer(db.session.get(Conversation, int(cid)), "tinyllama", None)
        db.session.commit()  # an answer no worker here runs: its worker died...
        db.session.get(Message, orphan.id).heartbeat_at = utcnow() - timedelta(minutes=5)  # ...a while ago
        db.session.commit()
    messages = [*HELLO, {"role": "assistant", "content": "Hello from the fake model."},
                {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"},
                {"role": "user", "content": "E"}]
    response = client.post(URL, json={"model": "tinyllama", "messages": messages},
                           headers={**key, "X-Conversation-Id": cid})
    assert response.status_code == 200 and response.headers["X-Conversation-Id"] == cid
    [(_, _, rows)] = conversations(app)
    assert rows == [("user", "hello", "complete"), ("assistant", "Hello from the fake model.", "complete"),
                    ("assistant", "", "interrupted"), ("user", "C", "complete"), ("assistant", "D", "complete"),
                    ("user", "E", "complete"), ("assistant", "Hello from the fake model.", "complete")]
    with app.app_context():
        count = db.session.scalar(select(func.count()).select_from(Message).where(Message.conversation_id == int(cid)))
        assert db.session.get(Conversation, int(cid)).message_count == count == 7


def test_web_conversations_are_marked_web(app, client, auth):
    client.post("/chat/", json={"prompt": "hi"}, headers=auth)
    assert conversations(app)[0][0] == "web"


def test_the_sidebar_marks_conversations_made_through_the_api(browser, key):
    browser.post(URL, json={"model": "tinyllama", "messages": HELLO}, headers=key)
    browser.post("/chat/", json={"prompt": "from the app's own API"}, headers=key)
    html = browser.get("/?new=1").get_data(as_text=True)
    assert html.count('title="made through the OpenAI-compatible /v1">API</abbr>') == 1


def test_a_system_message_too_long_for_a_system_prompt_is_stored_as_a_message(app, client, key):
    from webapp.limits import SYSTEM_PROMPT_MAX
    history = [{"role": "system", "content": "s" * (SYSTEM_PROMPT_MAX + 1)}, *HELLO]
    cid = client.post(URL, json={"model": "tinyllama", "messages": history}, headers=key).headers["X-Conversation-Id"]
    history += [{"role": "assistant", "content": "Hello from the fake model."}, {"role": "user", "content": "more"}]
    again = client.post(URL, json={"model": "tinyllama", "messages": history},
                        headers={**key, "X-Conversation-Id": cid})
    assert again.headers["X-Conversation-Id"] == cid
    [(_, system, rows)] = conversations(app)
    assert system == "" and [role for role, _, _ in rows] == ["system", "user", "assistant", "user", "assistant"]


def test_the_api_lists_conversations_by_source(client, key):
    ask(client, key)
    client.post("/chat/", json={"prompt": "from the app's own API"}, headers=key)
    for source in ("api", "web"):
        listed = client.get(f"/conversations?source={source}", headers=key).get_json()["conversations"]
        assert [c["source"] for c in listed] == [source]
    assert len(client.get("/conversations", headers=key).get_json()["conversations"]) == 2
    wrong = client.get("/conversations?source=cli", headers=key)
    assert wrong.status_code == 400 and wrong.get_json()["error"]["field"] == "source"


def test_hostile_json_is_a_400_not_a_500(client, key):
    """What the JSON API's parser refuses (webapp/api/guard.json_body) /v1 refuses too, in OpenAI's
    shape: a string no UTF-8 text can hold (a lone surrogate) and nesting too deep for the parser."""
    headers = {**key, "Content-Type": "application/json"}
    lone = '{"model": "tinyllama", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    response = client.post("/v1/chat/completions", data=lone, headers=headers)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["param"] == "messages[0].content"
    deep = client.post("/v1/chat/completions", data="[" * 100_000, headers=headers)
    assert deep.status_code == 400 and deep.get_json()["error"]["code"] == "invalid_json"


def test_a_finished_answer_is_answered_from_memory_not_read_back(client, key, ollama, monkeypatch):
    """A non-streaming call whose answer was generated and saved in this process answers with the row
    as its final write committed it (Live.final), not with a second read of it."""
    from webapp.service import turns
    reads = []
    fresh = turns._fresh_message
    monkeypatch.setattr(turns, "_fresh_message", lambda message_id: reads.append(message_id) or fresh(message_id))
    ollama.script(reply="from memory")
    response = ask(client, key)
    assert response.status_code == 200
    body = response.get_json()
    assert body["choices"][0]["message"]["content"] == "from memory" and body["usage"]["completion_tokens"] > 0
    assert reads == []


REPLY = "Short."


def test_a_call_that_starts_a_conversation_opens_it_in_one_statement(make_app, ollama):
    """/v1 with an API key, no per-person limits and no queue, on PostgreSQL: the request runs the key
    check and ONE statement opening the conversation (system prompt kept as the conversation's), each
    its own transaction (the answer is saved by its generation). The key's last use is written once
    a minute, alone too."""
    from sqlalchemy import event

    from webapp.extensions import db

    from helpers import login_token, make_user
    ollama.script(reply=REPLY)
    app = make_app(USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0, LLM_MAX_PARALLEL=0)
    make_user(app)
    client = app.test_client()
    key = {"Authorization": "Bearer " + client.post("/auth/keys", json={"name": "t"}, headers={
        "Authorization": f"Bearer {login_token(client)}"}).get_json()["key"]}
    with app.app_context():
        engine = db.engine
    postgres = engine.dialect.name == "postgresql"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    statements, me = [], threading.get_ident()

    def record(connection, cursor, statement, *args):
        if threading.get_ident() == me:  # not the watchdog's or the orphan sweeper's
            statements.append(statement.split(None, 1)[0].upper())
    for expected in (["SELECT", "UPDATE", "WITH"], ["SELECT", "WITH"]):
        statements.clear()
        event.listen(engine, "before_cursor_execute", record)
        try:
            response = client.post(URL, json={"model": "tinyllama", "messages": messages}, headers=key)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert response.status_code == 200, response.get_json()
        if postgres:
            assert statements == expected
    assert conversations(app) == [("api", "Be brief.", [("user", "hello", "complete"),
                                                        ("assistant", REPLY, "complete")])] * 2


def test_a_call_waiting_for_its_answer_does_not_read_it_while_it_is_generated(app, client, key, ollama):
    """A non-streaming call whose answer is generated in this process waits for it in memory: the
    request reads no message row while the answer runs (it used to read it once a second), and gets
    the final answer as its generation saved it."""
    from sqlalchemy import event

    from webapp.extensions import db
    words = [f"w{i}" for i in range(25)]
    ollama.script(reply=" ".join(words), delay=0.1)  # 2.5 s at the model
    with app.app_context():
        engine = db.engine
    reads, me = [], threading.get_ident()

    def record(connection, cursor, statement, *args):
        if threading.get_ident() == me and statement.lstrip().startswith("SELECT messages."):  # a row read
            reads.append(statement)
    event.listen(engine, "before_cursor_execute", record)
    try:
        response = ask(client, key)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["choices"][0]["message"]["content"] == " ".join(words)
    assert reads == []
