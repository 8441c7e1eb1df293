"""/v1 as real OpenAI clients see it: the official `openai` SDK (sync, async, streaming, errors) and
langchain-openai's ChatOpenAI (invoke and stream), against the app under gunicorn, with a personal
API key, on PostgreSQL and SQLite. Also OpenAI's semantics where they differ from the app's: a client
that goes away cancels the call (saved as cancelled, with its partial text)."""
import asyncio
import time

import openai
import pytest
import requests

from helpers import both_databases
from live import login

pytestmark = both_databases
REPLY = "Hello from the fake model."


@pytest.fixture
def key(server):
    auth = login(server.url, "alice", "correct horse battery")
    made = requests.post(server.url + "/auth/keys", json={"name": "sdk"}, headers=auth, timeout=10)
    assert made.status_code == 201, made.text
    return made.json()["key"]


@pytest.fixture
def sdk(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=20)


def api(server, key, path):
    response = requests.get(server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_sdk_lists_models_and_completes_a_three_turn_chat_as_one_conversation(server, sdk, key, ollama):
    assert [m.id for m in sdk.models.list()] == ["tinyllama:latest", "llama3.2:latest"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    conversation = None
    for turn in ("two", "three", None):
        headers = {"X-Conversation-Id": conversation} if conversation else {}
        raw = sdk.chat.completions.with_raw_response.create(model="tinyllama", messages=messages,
                                                            extra_headers=headers, temperature=0.2, seed=7)
        conversation = raw.headers["X-Conversation-Id"]
        completion = raw.parse()
        assert completion.choices[0].message.content == REPLY
        assert completion.choices[0].finish_reason == "stop" and completion.usage.total_tokens > 0
        assert ollama.chat_requests[-1]["messages"] == messages
        messages = messages + [{"role": "assistant", "content": completion.choices[0].message.content}]
        if turn:
            messages.append({"role": "user", "content": turn})
    stored = api(server, key, f"/conversations/{conversation}")
    assert stored["message_count"] == 6 and stored["system_prompt"] == "Be brief."
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 3
    assert len(api(server, key, "/conversations")["conversations"]) == 1


def test_sdk_streams_with_usage_and_length(sdk, ollama):
    stream = sdk.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": "hi"}],
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(REPLY.split())
    short = sdk.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": "hi"}],
                                        max_completion_tokens=2, stop=["END"])
    assert short.choices[0].finish_reason == "length" and short.choices[0].message.content == "Hello from "
    assert ollama.chat_requests[-1]["options"]["stop"] == ["END"]


def test_async_sdk_runs_calls_at_once(app, server, key, ollama):
    ollama.script(delay=0.05)
    # Three at once is past USER_MAX_RUNNING (2; the third would be a 429 RateLimitError, as designed):
    # an admin's per-person override lets this program run them.
    from webapp.auth.accounts import find_user
    from webapp.extensions import db
    with app.app_context():
        find_user("alice").max_running = 3
        db.session.commit()

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=20)
        calls = [client.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": f"q{i}"}])
                 for i in range(3)]
        results = await asyncio.gather(*calls)
        stream = await client.chat.completions.create(model="tinyllama", stream=True,
                                                      messages=[{"role": "user", "content": "s"}])
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return [r.choices[0].message.content for r in results], streamed

    answers, streamed = asyncio.run(main())
    assert answers == [REPLY] * 3 and streamed == REPLY


def test_sdk_raises_its_typed_errors(server, sdk, ollama):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="llmk_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": "hi"}], n=2)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    ollama.script(fail="midstream", fail_after=2)
    with pytest.raises(openai.APIError):
        for _ in sdk.chat.completions.create(model="tinyllama", stream=True,
                                             messages=[{"role": "user", "content": "hi"}]):
            pass
    ollama.script(fail="status", status=500)
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="tinyllama", messages=[{"role": "user", "content": "hi"}])


def test_langchain_chat_openai_invokes_and_streams(server, key):
    from langchain_openai import ChatOpenAI
    chat = ChatOpenAI(base_url=server.url + "/v1", api_key=key, model="tinyllama", max_retries=0, timeout=20)
    assert chat.invoke("Hi there").content == REPLY
    assert "".join(chunk.content for chunk in chat.stream("Stream please")) == REPLY
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    answer = chat.invoke([SystemMessage("Be brief."), HumanMessage("a"), AIMessage("b"), HumanMessage("c")])
    assert answer.content == REPLY and answer.usage_metadata["total_tokens"] > 0


def answer_of(server, key, conversation):
    return api(server, key, f"/conversations/{conversation}")["messages"][-1]


def test_a_client_that_disconnects_from_a_stream_cancels_it(server, key, ollama):
    ollama.script(reply=" ".join(f"w{i}" for i in range(200)), delay=0.05)
    response = requests.post(server.url + "/v1/chat/completions", stream=True, timeout=10,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "tinyllama", "stream": True,
                                   "messages": [{"role": "user", "content": "x"}]})
    conversation = response.headers["X-Conversation-Id"]
    lines = response.iter_lines()
    received = [next(lines) for _ in range(8)]
    assert any(b"w1" in line for line in received)
    response.close()  # the client goes away mid-answer
    answer = wait_for(lambda: (lambda m: m if m["status"] == "cancelled" else None)(
        answer_of(server, key, conversation)))
    assert answer["content"].startswith("w0 w1") and len(answer["content"].split()) < 200
    assert ollama.wait_for_event("client_closed", timeout=5)  # the model stopped generating too


def test_a_client_that_disconnects_from_a_plain_call_cancels_it(server, key, ollama):
    ollama.script(reply=" ".join(f"w{i}" for i in range(200)), delay=0.05)
    with pytest.raises(requests.ReadTimeout):
        requests.post(server.url + "/v1/chat/completions", timeout=(5, 1.5),
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "tinyllama", "messages": [{"role": "user", "content": "x"}]})
    conversation = api(server, key, "/conversations")["conversations"][0]["id"]
    answer = wait_for(lambda: (lambda m: m if m["status"] == "cancelled" else None)(
        answer_of(server, key, conversation)))
    assert answer["content"].startswith("w0") and len(answer["content"].split()) < 200


def test_a_revoked_key_is_refused_at_once_by_every_worker(server, sdk, key):
    assert sdk.models.list().data  # works (the server runs two workers)
    auth = login(server.url, "alice", "correct horse battery")
    [listed] = requests.get(server.url + "/auth/keys", headers=auth, timeout=10).json()["keys"]
    assert requests.delete(f"{server.url}/auth/keys/{listed['id']}", headers=auth, timeout=10).status_code == 204
    for _ in range(10):  # fresh connections, spread over the workers
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).models.list()
