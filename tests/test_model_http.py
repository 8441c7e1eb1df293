"""The app's own HTTP/1.1 exchange with a plain-HTTP model server (webapp.model_http), through the
LLM client, against a raw socket server that answers each request with bytes a test chose: the
framings a model server may use, what HTTP allows around them, and the ways a connection ends."""
import socket
import threading
import time

import pytest

from webapp import llm

MESSAGES = [{"role": "user", "content": "hi"}]
LINES = [b'{"message": {"content": "one "}, "done": false}\n',
         b'{"message": {"content": "two"}, "done": false}\n',
         b'{"message": {"content": ""}, "done": true, "done_reason": "stop", "eval_count": 2}\n']
BODY = b"".join(LINES)


def chunked(*pieces):
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
OK = CHUNKED + chunked(*LINES)


class RawServer:
    """Answers the n-th request with answers[n] (bytes, or a function of the socket that answers
    it), reading each request whole first; records the requests and the connections it accepted.
    After an answer the connection stays open for the next request unless `close_after` says so."""

    def __init__(self, answers, close_after=()):
        self.answers, self.close_after = list(answers), set(close_after)
        self.requests, self.connections = [], 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            file = conn.makefile("rb")
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = file.readline()
                    if not line:
                        return
                    head += line
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                self.requests.append(head + file.read(length))
                index = len(self.requests) - 1
                answer = self.answers[index] if index < len(self.answers) else OK
                if callable(answer):
                    answer(conn)
                else:
                    conn.sendall(answer)
                if index in self.close_after:
                    return

    def close(self):
        self._listener.close()


@pytest.fixture
def serve():
    servers = []

    def start(*answers, close_after=()):
        servers.append(RawServer(answers, close_after))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def client(server, **kwargs):
    return llm.OllamaClient(server.url, read_timeout=1.0, load_timeout=2.0, **kwargs)


def text(stream):
    chunks = list(stream)
    assert chunks[-1].done
    return "".join(chunk.text for chunk in chunks)


def test_the_request_is_http_1_1_with_its_body_and_the_session_s_headers(serve):
    server = serve(OK)
    model = client(server)
    model.session.headers["Authorization"] = "Bearer sk-test"
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    head, body = server.requests[0].split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert lines[0] == b"POST /api/chat HTTP/1.1"
    assert headers[b"Host"] == server.url.removeprefix("http://").encode()
    assert headers[b"Authorization"] == b"Bearer sk-test"
    assert headers[b"Content-Type"] == b"application/json"
    assert headers[b"Accept-Encoding"] == b"identity"  # the body is read as it comes
    assert int(headers[b"Content-Length"]) == len(body) and b'"tinyllama"' in body


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),  # sized, not chunked
    b"HTTP/1.1 100 Continue\r\n\r\n" + OK,  # an interim answer first
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n" + chunked(*LINES),  # any case
])
def test_other_framings_are_read_and_kept_alive(serve, answer):
    server = serve(answer, answer)
    model = client(server)
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert server.connections == 1


def test_an_answer_that_ends_with_its_connection_is_read_to_the_end_and_not_kept(serve):
    """HTTP/1.0, no length: the body is what comes until the server closes."""
    server = serve(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + BODY, close_after={0})
    model = client(server)
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert server.connections == 2


def test_connection_close_is_obeyed(serve):
    server = serve(OK.replace(b"200 OK\r\n", b"200 OK\r\nConnection: close\r\n"), close_after={0})
    model = client(server)
    for _ in range(2):
        assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert server.connections == 2 and len(server.requests) == 2


def test_a_kept_alive_connection_the_server_closed_is_not_used(serve):
    """A server that closes an idle kept-alive connection (uvicorn after 5 s): the next chat goes on
    a new connection, not into an error."""
    server = serve(OK, close_after={0})
    model = client(server)
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    time.sleep(0.1)  # the server's close has reached the client's socket
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert server.connections == 2


def test_a_request_the_server_closed_on_without_answering_is_sent_again_once(serve):
    """The race the check above cannot see: the server closes a kept-alive connection as the
    request goes out. The request goes once more, on a new connection; a new connection that
    fails the same way is an error (the server is not answering), not a loop."""
    def hang_up(conn):
        conn.shutdown(socket.SHUT_RDWR)
    server = serve(OK, hang_up, OK, hang_up)
    model = client(server)
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert len(server.requests) == 3 and server.connections == 2
    fresh = client(serve(hang_up, hang_up))
    with pytest.raises(llm.LLMUnreachable):
        fresh.chat_stream(MESSAGES, "tinyllama")


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + LINES[0], llm.UpstreamError),  # cut short
    (b"SSH-2.0-OpenSSH_9.2\r\n", llm.LLMUnreachable),  # not HTTP
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", llm.LLMUnreachable),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", llm.LLMUnreachable),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", llm.LLMUnreachable),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", llm.LLMUnreachable),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"\x1f\x8b"),
     llm.UpstreamError),  # compressed though "identity" was asked for
])
def test_a_broken_answer_is_a_typed_error(serve, answer, error):
    server = serve(answer, close_after={0})
    with pytest.raises(error):
        list(client(server).chat_stream(MESSAGES, "tinyllama"))


def test_an_error_answer_s_json_is_read_whole_and_the_connection_kept(serve):
    error = b'{"error": "model \'nope\' not found"}'
    server = serve(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(error), error), OK)
    model = client(server)
    with pytest.raises(llm.ModelNotFound):
        model.chat_stream(MESSAGES, "nope")
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two"
    assert server.connections == 1


def test_an_answer_without_a_body_is_not_waited_on(serve):
    """A 204 has no body whatever its headers say: the error comes at once, not after the load
    timeout spent waiting for a body that the kept-alive connection never brings."""
    server = serve(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", OK)
    model = client(server)
    started = time.monotonic()
    with pytest.raises(llm.UpstreamError):
        model.chat_stream(MESSAGES, "tinyllama")
    assert time.monotonic() - started < 1.0
    assert text(model.chat_stream(MESSAGES, "tinyllama")) == "one two" and server.connections == 1


def test_a_head_that_never_comes_is_a_timeout(serve):
    server = serve(lambda conn: time.sleep(3))
    started = time.monotonic()
    with pytest.raises(llm.LLMTimeout):
        client(server).chat_stream(MESSAGES, "tinyllama")
    assert 1.9 < time.monotonic() - started < 2.9  # the load timeout, not the read timeout


def test_a_header_value_with_a_line_break_is_refused_before_sending(serve):
    server = serve(OK)
    model = client(server)
    model.session.headers["Authorization"] = "Bearer x\r\nX-Injected: 1"
    with pytest.raises(llm.UpstreamError):
        model.chat_stream(MESSAGES, "tinyllama")
    assert not server.requests


def test_at_most_max_idle_connections_are_kept(serve):
    """Many answers at once each take a connection; afterwards only the pool's share stays open."""
    from webapp import model_http
    server = serve()
    pool = model_http.Pool("127.0.0.1", int(server.url.rsplit(":", 1)[1]), max_idle=2)
    answers = [pool.post("/api/chat", b"{}", {}, connect_timeout=1, head_timeout=1) for _ in range(4)]
    assert server.connections == 4
    for answer in answers:
        assert b"".join(answer.body()) == BODY
    assert len(pool._idle) == 2
    for _ in range(3):
        assert b"".join(pool.post("/api/chat", b"{}", {}, connect_timeout=1, head_timeout=1).body()) == BODY
    assert server.connections == 4  # reused


def test_an_address_is_connected_to_without_a_lookup_and_a_name_is_looked_up(serve, monkeypatch):
    """Under gevent a name lookup is a hand-off to a thread: an IP address needs none. A name is
    looked up for each new connection (the model server's address may change)."""
    from webapp import model_http
    server = serve()
    port = int(server.url.rsplit(":", 1)[1])
    lookups, lookup = [], socket.getaddrinfo

    def counted(host, *args, **kwargs):
        lookups.append(host)
        return lookup(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", counted)
    answer = model_http.Pool("127.0.0.1", port).post("/api/chat", b"{}", {}, connect_timeout=1, head_timeout=1)
    assert b"".join(answer.body()) == BODY and lookups == []
    answer = model_http.Pool("localhost", port).post("/api/chat", b"{}", {}, connect_timeout=1, head_timeout=1)
    assert b"".join(answer.body()) == BODY and lookups == ["localhost"]
    with pytest.raises(model_http.ConnectFailed):
        model_http.Pool("127.0.0.1", 9).post("/api/chat", b"{}", {}, connect_timeout=1, head_timeout=1)


def test_an_answer_closed_before_its_end_closes_its_connection_at_once(ollama):
    """Closing a stream midway (no Stop) hangs up on the model server then, not when the answer is
    garbage-collected: a socket's descriptor stays open while a file made of it is."""
    ollama.script(reply="a b c d e f g h", delay=0.2)
    stream = llm.OllamaClient(ollama.url, read_timeout=2.0, load_timeout=3.0).chat_stream(MESSAGES, "tinyllama")
    tokens = iter(stream)
    assert next(tokens).text == "a "
    closed_at = time.monotonic()
    stream.close()
    event = ollama.wait_for_event("client_closed", timeout=2)
    assert event is not None and event[1] - closed_at < 1.0
    assert stream._answer is not None  # still referenced: not the garbage collector's doing


def test_threads_share_one_client_s_connections(ollama):
    """Without gevent (the dev server, the tests) generations are threads, all taking and giving
    back connections of one pool at once: every answer arrives whole, and no more connections
    are opened than answers ran at once."""
    model = llm.OllamaClient(ollama.url, read_timeout=2.0, load_timeout=3.0)
    ollama.script(reply="one two three", delay=0.001)
    failures, texts = [], []

    def chat():
        try:
            for _ in range(10):
                texts.append("".join(chunk.text for chunk in model.chat_stream(MESSAGES, "tinyllama")))
        except Exception as exc:  # noqa: BLE001 - reported below with what it was
            failures.append(repr(exc))
    threads = [threading.Thread(target=chat) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures and texts == ["one two three"] * 80
    assert ollama.connections <= 8
