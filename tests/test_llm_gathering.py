"""Reading the model in windows (llm.Gathering): once the first token is out, the socket is read at
most once per window, whatever the model's pace; the answer, Stop and keep-alive are as before."""
import time

import pytest

from webapp import llm

MESSAGES = [{"role": "user", "content": "hi"}]
WORDS = [f"w{index} " for index in range(12)]


@pytest.fixture(params=["ollama", "openai"])
def backend(request, ollama):
    if request.param == "ollama":
        return llm.OllamaClient(ollama.url, read_timeout=2.0, load_timeout=3.0)
    return llm.OpenAIClient(ollama.url + "/v1", read_timeout=2.0, load_timeout=3.0)


@pytest.fixture
def reads(monkeypatch):
    """The times the gathering reads of the socket returned."""
    times, read = [], llm.Gathering.read1

    def counted(self):
        data = read(self)
        times.append(time.monotonic())
        return data
    monkeypatch.setattr(llm.Gathering, "read1", counted)
    return times


def test_after_the_first_token_the_socket_is_read_once_per_window(backend, ollama, reads):
    window = 0.15
    ollama.script(reply="".join(WORDS), delay=0.02)  # a token every 20 ms: 12 reads without gathering
    started = time.monotonic()
    stream = backend.chat_stream(MESSAGES, "tinyllama", gather=window)
    assert stream.gathers
    chunks = list(stream)
    elapsed = time.monotonic() - started
    assert "".join(chunk.text for chunk in chunks) == "".join(WORDS) and chunks[-1].done
    after_first = reads[1:]  # the first read brought the first token; the window begins after it
    gaps = [after - before for before, after in zip(after_first, after_first[1:], strict=False)]
    assert gaps and all(gap >= window - 0.001 for gap in gaps), gaps  # never sooner than a window apart
    assert len(reads) <= elapsed / window + 4 < len(WORDS)


def test_the_first_token_is_not_held_back(backend, ollama):
    ollama.script(reply="one two three", delay=0.01)
    started = time.monotonic()
    stream = iter(backend.chat_stream(MESSAGES, "tinyllama", gather=1.0))
    assert next(stream).text == "one " and time.monotonic() - started < 0.9
    assert "".join(chunk.text for chunk in stream) == "two three"


def test_gathered_answers_keep_their_connection(backend, ollama):
    for reply in ("one two three", "four five", "six"):
        ollama.script(reply=reply, delay=0.01)
        chunks = list(backend.chat_stream(MESSAGES, "tinyllama", gather=0.05))
        assert "".join(chunk.text for chunk in chunks) == reply and chunks[-1].done
    assert ollama.connections == 1


def test_stop_ends_a_gathering_stream_within_its_window(ollama):
    client = llm.OllamaClient(ollama.url, read_timeout=2.0, load_timeout=3.0)
    ollama.script(reply="".join(WORDS), delay=0.05)
    abort = llm.Abort()
    stream = iter(client.chat_stream(MESSAGES, "tinyllama", abort=abort, gather=0.2))
    next(stream)
    stopped = time.monotonic()
    abort()
    with pytest.raises(llm.Cancelled):
        list(stream)
    assert time.monotonic() - stopped < 0.5
    assert ollama.wait_for_event("client_closed", timeout=3)


def test_no_window_reads_as_the_answer_comes(backend, ollama, reads):
    """Without a window (a turn answered whole, in its request) the app still takes the answer out of
    its chunks itself, but reads the socket as each token comes."""
    ollama.script(reply="".join(WORDS), delay=0.03)
    stream = backend.chat_stream(MESSAGES, "tinyllama")
    assert not stream.gathers
    assert "".join(chunk.text for chunk in stream) == "".join(WORDS)
    assert len(reads) >= len(WORDS) - 2  # about one read per token: nothing waited for more


def test_a_window_given_as_a_function_is_asked_before_each_read(ollama, reads):
    """A worker widens its windows when it reads many answers at once (generation: Registry.window):
    a window that grows mid-answer spaces the reads after it further apart."""
    client = llm.OllamaClient(ollama.url, read_timeout=2.0, load_timeout=3.0)
    ollama.script(reply="".join(WORDS * 2), delay=0.02)
    chunks = list(client.chat_stream(MESSAGES, "tinyllama", gather=lambda: 0.2 if len(reads) >= 3 else 0.03))
    assert "".join(chunk.text for chunk in chunks) == "".join(WORDS * 2)
    gaps = [after - before for before, after in zip(reads[1:], reads[2:], strict=False)]
    assert gaps[0] < 0.2 and all(gap >= 0.2 - 0.001 for gap in gaps[2:]), gaps


@pytest.mark.parametrize("script, error", [
    (dict(fail="midstream", fail_after=3, error="boom"), llm.UpstreamError),
    (dict(fail="cut", fail_after=3), llm.UpstreamError),
    (dict(fail="stall", fail_after=3, stall=3.0), llm.LLMTimeout),
])
@pytest.mark.parametrize("window", [0.05, 0])
def test_a_gathered_answer_fails_as_any_other(backend, ollama, script, error, window):
    """The gathered body is taken out of its chunks by the app (model_http.unchunked), not by urllib3: a
    broken answer is still the same typed error, after the tokens that came."""
    ollama.script(reply="one two three four five", delay=0.01, **script)
    texts = []
    with pytest.raises(error):
        for chunk in backend.chat_stream(MESSAGES, "tinyllama", gather=window):
            texts.append(chunk.text)
    assert texts and "".join(texts) in "one two three four five"


def _raw_server(body):
    """A one-shot HTTP server that answers any request with this chunked `body` (bytes, framing and all)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + body)
            time.sleep(0.5)
        listener.close()
    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("window", [0.05, 0])
@pytest.mark.parametrize("tail", [b"zz\r\nnot a size\r\n", b"5\r\nabcdefgh\r\n"])
def test_a_malformed_chunk_is_an_upstream_error(tail, window):
    line = b'{"message": {"content": "one "}, "done": false}\n'
    url = _raw_server(_chunk(line) + tail)
    client = llm.OllamaClient(url, read_timeout=2.0, load_timeout=3.0)
    stream = iter(client.chat_stream(MESSAGES, "tinyllama", gather=window))
    assert next(stream).text == "one "
    started = time.monotonic()
    with pytest.raises(llm.UpstreamError):
        list(stream)
    assert time.monotonic() - started < 0.4  # said at once, not when the server hangs up (0.5 s)


@pytest.mark.parametrize("window", [0.05, 0])
def test_chunks_split_anywhere_and_trailers_are_read_whole(window):
    """Chunk sizes in any case, extensions, lines split across chunks, trailers after the last one."""
    lines = [b'{"message": {"content": "\xd0\x9f\xd1\x80\xd0\xb8 "}, "done": false}\n',
             b'{"message": {"content": "two"}, "done": false}\n{"message": {"content": "", "role": "assistant"},',
             b' "done": true, "eval_count": 2}\n']
    body = (b"%X;name=value\r\n%s\r\n" % (len(lines[0]), lines[0]) + _chunk(lines[1][:7]) + _chunk(lines[1][7:])
            + _chunk(lines[2]) + b"0\r\nX-Trailer: yes\r\n\r\n")
    client = llm.OllamaClient(_raw_server(body), read_timeout=2.0, load_timeout=3.0)
    chunks = list(client.chat_stream(MESSAGES, "tinyllama", gather=window))
    assert "".join(chunk.text for chunk in chunks) == "При two" and chunks[-1].done and chunks[-1].eval_count == 2
