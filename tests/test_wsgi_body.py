"""A response's body reaches the server as it is when it is a file (webapp.wsgi_body): the open
request count and the access line still end with it, and the server may send it with sendfile."""
import logging
from pathlib import Path

import pytest
import requests
from gunicorn.http.wsgi import FileWrapper
from werkzeug.wsgi import ClosingIterator

from webapp.capacity import OpenRequests

HTMX = Path(__file__).parent.parent / "static" / "vendor" / "htmx-2.0.11.min.js"
BUNDLE = Path(__file__).parent.parent / "static" / "vendor" / "swagger-ui" / "swagger-ui-bundle.js"


def call(middleware, body, environ=None):
    environ = {"REQUEST_METHOD": "GET", "wsgi.file_wrapper": FileWrapper, **(environ or {})}
    return middleware(environ, lambda status, headers, exc_info=None: None)


def test_a_file_reaches_the_server_as_its_own_wrapper_and_still_ends_the_count():
    """gunicorn uses sendfile only for a body that is its file wrapper (isinstance): the counter
    must not wrap it in an iterator, and still counts the request until the file is closed."""
    file = HTMX.open("rb")
    wrapped = FileWrapper(file)
    counter = OpenRequests(lambda environ, start: wrapped)
    body = call(counter, wrapped)
    assert body is wrapped and counter.count == 1
    body.close()
    assert counter.count == 0 and file.closed


def test_any_other_body_is_counted_until_closed():
    counter = OpenRequests(lambda environ, start: [b"a", b"b"])
    body = call(counter, None)
    assert isinstance(body, ClosingIterator) and counter.count == 1
    assert b"".join(body) == b"ab"
    body.close()
    assert counter.count == 0


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if record.name == "webapp.access":
            self.lines.append(record.getMessage())


@pytest.fixture
def access_lines():
    handler = Lines()
    logging.getLogger("webapp").addHandler(handler)
    yield handler.lines
    logging.getLogger("webapp").removeHandler(handler)


def test_a_static_file_gets_its_one_access_line(client, access_lines):
    """werkzeug hands a file (send_file) to the server as it is and never runs the response's
    close callbacks for it: the access line rides on the file's close instead. GET, HEAD and a
    revalidation (304) each write one line."""
    path = "/static/vendor/htmx-2.0.11.min.js"
    response = client.get(path)
    assert response.status_code == 200 and response.data == HTMX.read_bytes()
    response.close()
    head = client.head(path)
    head.close()
    again = client.get(path, headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304
    again.close()
    assert [line.split()[:3] for line in access_lines] == [
        ["GET", path, "200"], ["HEAD", path, "200"], ["GET", path, "304"]], access_lines


def test_gunicorn_serves_a_static_file_whole_with_its_access_line(app, ollama, database_url):
    import time

    from live import LiveServer
    server = LiveServer(database_url, ollama.url).start()
    try:
        for _ in range(2):
            response = requests.get(server.url + "/static/vendor/htmx-2.0.11.min.js", timeout=10)
            assert response.status_code == 200 and response.content == HTMX.read_bytes()
        # A file larger than the socket's buffer: sendfile must wait for the client, not fail.
        with requests.get(server.url + "/static/vendor/swagger-ui/swagger-ui-bundle.js", timeout=10,
                          stream=True) as big:
            time.sleep(0.3)  # the client reads late: the server's socket buffer fills first
            assert big.status_code == 200 and big.raw.read() == (BUNDLE.read_bytes())
        deadline = time.monotonic() + 5
        while server.log_text().count("GET /static/vendor/htmx-2.0.11.min.js 200") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.log_text().count("GET /static/vendor/htmx-2.0.11.min.js 200") == 2, server.log_text()[-2000:]
    finally:
        server.stop()
