"""webapp.llm against the Ollama-protocol test server: both backends, every typed error."""
import threading
import time

import pytest

from webapp import llm

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["ollama", "openai"])
def backend(request, ollama):
    if request.param == "ollama":
        return llm.OllamaClient(ollama.url, read_timeout=1.0, load_timeout=3.0, keep_alive="5m",
                                options={"temperature": 0.1})
    return llm.OpenAIClient(ollama.url + "/v1", read_timeout=1.0, load_timeout=3.0)


def text_of(stream):
    chunks = list(stream)
    return chunks, "".join(c.text for c in chunks)


def test_streams_and_reports_counters(backend, ollama):
    ollama.script(reply="Привет, мир! 🌍 ok", prompt_eval_count=9)
    chunks, text = text_of(backend.chat_stream(MESSAGES, "tinyllama"))
    assert text == "Привет, мир! 🌍 ok"
    final = chunks[-1]
    assert final.done and final.done_reason == "stop" and final.eval_count == 4
    assert final.prompt_eval_count == 9


def test_ollama_request_shape(ollama):
    client = llm.OllamaClient(ollama.url, keep_alive="10m", options={"temperature": 0.2, "num_ctx": 4096})
    list(client.chat_stream(MESSAGES, "tinyllama", {"num_predict": 50}))
    sent = ollama.chat_requests[-1]
    assert sent["stream"] is True and sent["keep_alive"] == "10m"
    assert sent["options"] == {"temperature": 0.2, "num_ctx": 4096, "num_predict": 50}


def test_length_limit(backend, ollama):
    ollama.script(reply="a b c d e f g")
    chunks, text = text_of(backend.chat_stream(MESSAGES, "tinyllama", {"num_predict": 3}))
    assert text == "a b c " and chunks[-1].done_reason == "length"


def test_lists_models_and_health(backend):
    assert [m["name"] for m in backend.list_models()] == ["tinyllama:latest", "llama3.2:latest"]
    assert backend.health()["backend"] == backend.name


def test_unknown_model(backend):
    with pytest.raises(llm.ModelNotFound, match="nope"):
        backend.chat_stream(MESSAGES, "nope")


def test_unreachable():
    for client in (llm.OllamaClient("http://127.0.0.1:9"), llm.OpenAIClient("http://127.0.0.1:9/v1")):
        with pytest.raises(llm.LLMUnreachable):
            client.list_models()
        with pytest.raises(llm.LLMUnreachable):
            client.chat_stream(MESSAGES, "tinyllama")


@pytest.mark.parametrize("script, error", [
    (dict(fail="status", status=500), llm.UpstreamError),
    (dict(fail="status", status=503, error="server busy"), llm.LLMUnreachable),
    (dict(fail="midstream", fail_after=1, error="boom"), llm.UpstreamError),
    (dict(fail="cut", fail_after=1), llm.UpstreamError),
    (dict(fail="stall", fail_after=1, stall=3.0), llm.LLMTimeout),
])
def test_failures_are_typed(backend, ollama, script, error):
    ollama.script(reply="one two three", **script)
    with pytest.raises(error):
        list(backend.chat_stream(MESSAGES, "tinyllama"))


def test_slow_model_load_uses_the_load_timeout_not_the_read_timeout(backend, ollama):
    ollama.script(reply="loaded at last", fail="headers_stall", stall=1.5)  # longer than read_timeout=1
    chunks, text = text_of(backend.chat_stream(MESSAGES, "tinyllama"))
    assert text == "loaded at last"
    ollama.script(reply="too slow", fail="headers_stall", stall=5.0)  # longer than load_timeout=3
    with pytest.raises(llm.LLMTimeout):
        backend.chat_stream(MESSAGES, "tinyllama")


def test_abort_from_another_thread_closes_the_upstream_connection(backend, ollama):
    ollama.script(reply="a b c d e f g h i j", delay=0.3)
    stream = backend.chat_stream(MESSAGES, "tinyllama")
    seen = []

    def consume():
        try:
            for chunk in stream:
                seen.append(chunk.text)
        except llm.Cancelled:
            seen.append("<cancelled>")
    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.7)
    aborted_at = time.monotonic()
    stream.abort()
    reader.join(2)
    assert not reader.is_alive() and seen[-1] == "<cancelled>"
    event = ollama.wait_for_event("client_closed", timeout=2)
    assert event is not None and event[1] - aborted_at < 1.0


def test_abort_while_the_model_is_still_loading(backend, ollama):
    """Stop before any header arrived (a model loading for minutes) still closes the connection."""
    ollama.script(reply="never seen", fail="headers_stall", stall=2.5)
    abort = llm.Abort()
    outcome = []

    def request():
        try:
            list(backend.chat_stream(MESSAGES, "tinyllama", abort=abort))
            outcome.append("finished")
        except llm.Cancelled:
            outcome.append("cancelled")
    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.5)
    aborted_at = time.monotonic()
    abort()
    thread.join(2)
    assert outcome == ["cancelled"]
    event = ollama.wait_for_event("client_closed", timeout=2)
    assert event is not None and event[1] - aborted_at < 1.0


def test_a_chat_is_the_app_s_own_exchange(backend, ollama, monkeypatch):
    """A plain-HTTP model server with no proxy: the chat skips requests' and urllib3's per-call
    machinery (webapp.model_http, kept alive as before) and still sends the session's headers (an
    API key)."""
    import requests
    import urllib3

    def not_this(*args, **kwargs):
        raise AssertionError("the chat went through requests or urllib3")
    monkeypatch.setattr(requests.Session, "request", not_this)
    monkeypatch.setattr(urllib3.HTTPConnectionPool, "urlopen", not_this)
    backend.session.headers["Authorization"] = "Bearer sk-test"
    ollama.script(reply="straight through")
    assert text_of(backend.chat_stream(MESSAGES, "tinyllama"))[1] == "straight through"
    sent = ollama.requests[-1]["headers"]
    assert sent["Authorization"] == "Bearer sk-test" and sent["Content-Type"] == "application/json"


def test_a_proxied_or_tls_model_server_is_left_to_requests(ollama, monkeypatch):
    """With a proxy configured for the model server's address, the chat goes through it, as requests
    sends it (here a closed port: unreachable); TLS is requests' to set up too."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = llm.OllamaClient(ollama.url)
    with pytest.raises(llm.LLMUnreachable):
        list(proxied.chat_stream(MESSAGES, "tinyllama"))
    assert not ollama.chat_requests  # it never reached the server directly
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert text_of(llm.OllamaClient(ollama.url).chat_stream(MESSAGES, "tinyllama"))[1]
    assert llm.OllamaClient("https://ollama.example")._direct is None


def test_a_chat_left_to_requests_streams_gathers_and_keeps_its_connection(backend, ollama):
    """Credentials for the model server (netrc's, here the session's own) leave the chat to requests:
    the answer is still read by the app in windows, and its connection kept for the next one."""
    backend.session.auth = ("user", "secret")
    model = type(backend)(backend.base_url, session=backend.session, read_timeout=1.0, load_timeout=3.0)
    assert model._direct is None
    for reply in ("one two three", "four five"):
        ollama.script(reply=reply, delay=0.01)
        stream = model.chat_stream(MESSAGES, "tinyllama", gather=0.05)
        assert stream.gathers and text_of(stream)[1] == reply
    assert ollama.connections == 1 and ollama.requests[-1]["headers"]["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("line", [
    '{"message": {"role": "assistant", "content": "Привет, 世界 🙂"}, "done": false}',
    '{"message": {"content": "\\ud83d\\ude42 \\u00e9"}, "done": false}',  # escaped pairs
    '{"message": {"content": "\\ud800 alone"}, "done": false}',  # a lone surrogate: only json takes it
    '{"done": true, "eval_count": 20, "total_duration": NaN}',     # NaN: only json takes it
    'data: {"choices": [{"delta": {"content": "x"}}]}'[6:],
])
def test_stream_lines_parse_as_json_parses_them(line):
    """The model's lines are parsed by orjson for speed; whatever json accepts still parses the same."""
    import json
    import math
    expected, got = json.loads(line), llm._loads(line)
    if "NaN" in line:
        assert math.isnan(got["total_duration"]) and got["eval_count"] == expected["eval_count"]
    else:
        assert got == expected


def test_a_line_that_is_not_json_is_still_a_value_error():
    """What the stream's reader turns into a failed answer: json's ValueError, as before orjson."""
    with pytest.raises(ValueError):
        llm._loads('{"message": {"content": "cut')
