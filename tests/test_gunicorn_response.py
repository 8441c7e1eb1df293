"""A response's head leaves with its first body bytes (webapp/gunicorn_response.py): the same bytes
as gunicorn's own Response writes, in fewer sends. Driven through gunicorn's own request parser and
wsgi.create, on a socket that records each send."""
import re

import pytest
from gunicorn.config import Config
from gunicorn.http import RequestParser, wsgi

from webapp.gunicorn_response import OneSendResponse


class Recorder:
    def __init__(self):
        self.sends = []

    def sendall(self, data):
        self.sends.append(bytes(data))

    def send(self, data):
        self.sends.append(bytes(data))
        return len(data)


def respond(response_class, request, status, headers, writes):
    cfg = Config()
    req = next(RequestParser(cfg, iter([request]), ("127.0.0.1", 1)))
    sock = Recorder()
    resp, _ = wsgi.create(req, sock, ("127.0.0.1", 1), ("127.0.0.1", 8000), cfg, response_class=response_class)
    resp.start_response(status, headers)
    for data in writes:
        resp.write(data)
    resp.close()
    return [re.sub(rb"Date: [^\r]*", b"Date: -", data) for data in sock.sends]


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
JSON = [("Content-Type", "application/json"), ("Content-Length", "11")]
SSE = [("Content-Type", "text/event-stream")]


@pytest.mark.parametrize(("request_", "status", "headers", "writes", "sends"), [
    (GET, "200 OK", JSON, [b'{"a": "b"}\n'], (2, 1)),  # a whole JSON answer: one send
    (GET, "200 OK", SSE, [b"data: 1\n\n", b"data: 2\n\n"], (4, 3)),  # head + first event, second, end
    (GET, "200 OK", SSE, [b"", b"data: 1\n\n"], (3, 3)),  # an empty first write sends the head at once
    (HEAD, "200 OK", JSON, [b'{"a": "b"}\n'], (1, 1)),  # no body on a HEAD: the head alone
    (GET, "200 OK", [("Content-Length", "2")], [b"abc", b"more"], (2, 1)),  # cut at Content-Length
    (GET, "204 No Content", [], [], (1, 1)),  # no write at all: close sends the head
], ids=["json", "stream", "empty-first", "head", "cut", "no-body"])
def test_the_same_bytes_in_fewer_sends(request_, status, headers, writes, sends):
    theirs = respond(wsgi.Response, request_, status, headers, writes)
    ours = respond(OneSendResponse, request_, status, headers, writes)
    assert b"".join(ours) == b"".join(theirs)
    assert (len(theirs), len(ours)) == sends, (theirs, ours)


def test_each_worker_installs_it(monkeypatch):
    """gunicorn's workers build their responses with wsgi.create's module-level Response."""
    import gc
    import runpy
    from pathlib import Path

    monkeypatch.setattr(gc, "freeze", lambda: None)  # what a worker does after; not to this process
    conf = runpy.run_path(str(Path(__file__).parent.parent / "webapp" / "gunicorn_conf.py"))

    class Worker:
        class log:
            @staticmethod
            def info(message):
                pass
    original = wsgi.Response
    try:
        conf["post_worker_init"](Worker())
        assert wsgi.Response is OneSendResponse
    finally:
        wsgi.Response = original
