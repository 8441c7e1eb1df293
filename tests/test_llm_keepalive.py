"""Connections to the LLM server are kept alive: one TCP connection serves answer after answer."""
import pytest

from webapp import llm

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["ollama", "openai"])
def backend(request, ollama):
    if request.param == "ollama":
        return llm.OllamaClient(ollama.url, read_timeout=1.0, load_timeout=3.0)
    return llm.OpenAIClient(ollama.url + "/v1", read_timeout=1.0, load_timeout=3.0)


def test_consecutive_streams_reuse_one_connection(backend, ollama):
    for reply in ("one two three", "four five", "six"):
        ollama.script(reply=reply)
        chunks = list(backend.chat_stream(MESSAGES, "tinyllama"))
        assert "".join(c.text for c in chunks) == reply and chunks[-1].done
    assert ollama.connections == 1


def test_a_late_stop_does_not_cut_the_reused_connection(ollama):
    """Stop pressed after an answer ended must not shut down the pooled socket the next answer uses."""
    client = llm.OllamaClient(ollama.url, read_timeout=1.0, load_timeout=3.0)
    first = llm.Abort()
    assert list(client.chat_stream(MESSAGES, "tinyllama", abort=first))[-1].done
    ollama.script(reply="a b c d", delay=0.05)
    stream = iter(client.chat_stream(MESSAGES, "tinyllama"))
    assert next(stream).text == "a "
    first()  # the first answer's Stop, arriving late
    assert "".join(c.text for c in stream) == "b c d"
    assert ollama.connections == 1


def test_a_stopped_stream_does_not_poison_the_pool(ollama):
    """A stream cut by Stop loses its connection (Ollama must see it close), and the next one works."""
    client = llm.OllamaClient(ollama.url, read_timeout=1.0, load_timeout=3.0)
    ollama.script(reply="a b c d e f", delay=0.05)
    abort = llm.Abort()
    stream = iter(client.chat_stream(MESSAGES, "tinyllama", abort=abort))
    next(stream)
    abort()
    with pytest.raises(llm.Cancelled):
        list(stream)
    assert ollama.wait_for_event("client_closed", timeout=3)
    ollama.script(reply="fine")
    assert "".join(c.text for c in client.chat_stream(MESSAGES, "tinyllama")) == "fine"


def test_a_request_s_head_and_body_leave_in_one_send(backend, ollama, monkeypatch):
    """urllib3 sends a request's head and body apart (two segments, two wake-ups of the model
    server); the app's connections send them together. Every call the client makes: the chat on a
    new and on a kept-alive connection, and the list of models (a GET: its head alone)."""
    import socket
    import threading
    sends, me, original = [], threading.get_ident(), socket.socket.sendall

    def counting(sock, data, *args):
        if threading.get_ident() == me:  # not the model server's
            sends.append(bytes(data))
        return original(sock, data, *args)
    monkeypatch.setattr(socket.socket, "sendall", counting)
    for reply in ("one two", "three"):
        ollama.script(reply=reply)
        sends.clear()
        assert "".join(c.text for c in backend.chat_stream(MESSAGES, "tinyllama")) == reply
        assert len(sends) == 1 and sends[0].startswith(b"POST "), sends
        assert b'"tinyllama"' in sends[0].split(b"\r\n\r\n", 1)[1], sends  # the body, after the head
    sends.clear()
    assert backend.list_models()
    assert len(sends) == 1 and sends[0].startswith(b"GET ") and sends[0].endswith(b"\r\n\r\n"), sends
