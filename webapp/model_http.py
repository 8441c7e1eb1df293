"""One HTTP/1.1 exchange with a plain-HTTP model server, over kept-alive sockets: the chat's path.

A chat call is always the same exchange: one POST with a JSON body, one answer whose head is a
status line and a few headers and whose body is chunked (NDJSON or SSE). urllib3 does it through
http.client, which parses the head with the `email` package and builds a response of several
layers: the model call was 13 % of a c=1 turn's CPU, most of it that machinery. Here the request
goes out in one send, the head is read line by line, and the body is taken out of its chunks all
that one read brought at once. Kept-alive sockets are reused newest first, and one that the server
closed while it sat idle is noticed before it is used (as urllib3 does); a request on a reused
socket that the server closed before answering is sent once more on a new one.

TLS, proxies and netrc credentials are not handled here: llm leaves those to requests.
"""
import collections
import ipaddress
import json
import socket

from urllib3.util.wait import wait_for_read

HEAD_LINE_MAX = 64 * 1024  # a status or header line longer than this is not a model server's
HEAD_LINES_MAX = 100
BODY_MAX = 1024 * 1024  # the most read of an answer taken whole (an error's JSON)


class ProtocolError(ConnectionError):
    """The model server's answer is not HTTP/1.1 as it should be, or it ended too soon."""

    before_answer = False  # True: the connection closed before a byte of the answer came


class ConnectFailed(ConnectionError):
    """No connection could be made to the model server (refused, unresolvable, timed out)."""


class Pool:
    """Kept-alive connections to one model server, at most `max_idle` of them idle."""

    def __init__(self, host, port, max_idle=64):
        self._address = (host.strip("[]"), port)  # an IPv6 literal comes bracketed in a URL
        self._family = _family_of(self._address[0])
        self._host = host if port == 80 else f"{host}:{port}"
        self._idle = collections.deque()  # (socket, file) pairs, newest last
        self._max_idle = max_idle

    def post(self, path, body, headers, *, connect_timeout, head_timeout, abort=None):
        """POST `body` (bytes) to `path` and read the answer's head (waiting up to `head_timeout`).
        `abort` (llm.Abort) is given the socket before anything is sent, so a Stop while the model
        loads shuts it down. Raises ConnectFailed, ProtocolError or another OSError (timeouts)."""
        message = self._request(path, body, headers)
        while True:
            sock, file, reused = self._connection(connect_timeout)
            if abort is not None:
                abort.attach(sock)
            try:
                sock.settimeout(head_timeout)
                sock.sendall(message)
                return Answer(self, sock, file)
            except (ProtocolError, ConnectionResetError, BrokenPipeError) as exc:
                _close(sock, file)
                # A kept-alive socket the server closed as the request went out: it never saw it.
                closed = not isinstance(exc, ProtocolError) or exc.before_answer
                if not (reused and closed) or (abort is not None and abort.requested):
                    raise
            except BaseException:
                _close(sock, file)
                raise

    def _request(self, path, body, headers):
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._host}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"the header {name!r} has a line break in it")
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        return "\r\n".join(lines).encode("latin-1") + body

    def _connection(self, connect_timeout):
        """A kept-alive socket that is still open (reused=True), else a new one."""
        while True:
            try:
                sock, file = self._idle.pop()  # taken whole: generations may be threads (no gevent)
            except IndexError:
                break
            if not wait_for_read(sock, timeout=0):  # nothing to read: not closed by the server
                return sock, file, True
            _close(sock, file)
        try:
            sock = self._connect(connect_timeout)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self._host}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as urllib3 does
        return sock, sock.makefile("rb"), False

    def _connect(self, timeout):
        if self._family is None:  # a name: looked up for each new connection, as it may move
            return socket.create_connection(self._address, timeout)
        # An address already: no lookup, which under gevent is a hand-off to a thread each time
        # (3 % of a worker's CPU in a burst of 1,000 streams, each on a new connection).
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _keep(self, sock, file):
        if len(self._idle) < self._max_idle:
            self._idle.append((sock, file))
        else:
            _close(sock, file)


class Answer:
    """The model server's answer: `status`, `headers` (lower-case names), the body to read."""

    def __init__(self, pool, sock, file):
        self.sock, self.file = sock, file
        self._pool = pool
        self._open = True
        version = self._read_status()
        self.headers = self._read_headers()
        connection = self.headers.get("connection", "").lower()
        coding = self.headers.get("transfer-encoding", "").lower()
        if self.status in (204, 304):  # no body, whatever the headers say (RFC 9112, 6.3)
            self.chunked, self.length = False, 0
        else:
            self.chunked = coding.rsplit(",", 1)[-1].strip() == "chunked"
            self.length = None if self.chunked or coding else _length(self.headers.get("content-length"))
        # Kept alive: HTTP/1.1, not asked to close, and a body whose end is known.
        self._reusable = (version == "HTTP/1.1" and "close" not in connection
                          and (self.chunked or self.length is not None))

    def _read_status(self):
        while True:
            line = self._line()
            if not line:
                error = ProtocolError("the model server closed the connection without answering")
                error.before_answer = True
                raise error
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise ProtocolError(f"not an HTTP status line: {line[:80]!r}")
            self.status = int(parts[1])
            if self.status >= 200:
                return parts[0].decode("ascii", "replace")
            self._read_headers()  # 100 Continue and other interim answers: their headers, then on

    def _read_headers(self):
        headers = {}
        for _ in range(HEAD_LINES_MAX):
            line = self._line()
            if line in (b"\r\n", b"\n"):
                return headers
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProtocolError(f"not a header line: {line[:80]!r}")
            name = name.strip().lower().decode("latin-1")
            value = value.strip().decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise ProtocolError("too many header lines in the model server's answer")

    def _line(self):
        line = self.file.readline(HEAD_LINE_MAX + 1)
        if len(line) > HEAD_LINE_MAX:
            raise ProtocolError("a header line too long in the model server's answer")
        if line and not line.endswith(b"\n"):
            raise ProtocolError("the model server's answer ended inside its head")
        return line

    @property
    def encoded(self):
        """True when the body has a content coding (gzip...): not asked for, not read here."""
        return self.headers.get("content-encoding", "identity").lower() != "identity"

    def body(self, source=None):
        """The body's bytes as they come (out of their chunks when chunked). `source`: what to read
        the socket's file through (llm.Gathering paces the reads of a chunked body); its read1()
        takes no argument. At the body's end the connection goes back to the pool."""
        if self.chunked:
            return unchunked(source or _Reads(self.file), self.done)
        return self._sized()

    def _sized(self):
        left = self.length
        while left is None or left > 0:
            data = self.file.read1(65536 if left is None else min(left, 65536))
            if not data:
                if left is None:  # the body ends when the connection does
                    self.close()
                    return
                raise ProtocolError("the model server closed the answer before its end")
            if left is not None:
                left -= len(data)
            yield data
        self.done()

    def read(self, limit=BODY_MAX):
        """The whole body (an error's JSON), at most `limit` bytes."""
        data = b""
        for piece in self.body():
            data += piece
            if len(data) > limit:
                self.close()
                raise ProtocolError("the model server's answer is too long to take whole")
        return data

    def json(self):
        return json.loads(self.read())

    def done(self):
        """The body was read to its end: the connection serves the next request, if it may."""
        if self._open:
            self._open = False
            if self._reusable:
                self._pool._keep(self.sock, self.file)
            else:
                _close(self.sock, self.file)

    def close(self):
        """Done with the answer: a body not read to its end closes the connection (the server sees
        the client leave, which is how Ollama learns to stop generating)."""
        if self._open:
            self._open = False
            _close(self.sock, self.file)


class _Reads:
    """read1() of the socket's file with no argument, as unchunked() asks of its source."""

    def __init__(self, file):
        self._file = file

    def read1(self):
        return self._file.read1(65536)


def _close(sock, file):
    """Close a connection now: a socket's descriptor stays open while a file made of it is."""
    file.close()
    sock.close()


def _family_of(host):
    """AF_INET or AF_INET6 for an IP address, None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _length(value):
    if value is None:
        return None
    try:
        length = int(value.split(",")[0])
    except ValueError:
        raise ProtocolError(f"a bad Content-Length from the model server: {value[:40]!r}") from None
    if length < 0:
        raise ProtocolError("a negative Content-Length from the model server")
    return length


def unchunked(source, on_end):
    """The data of a chunked body read through `source` (its read1() brings what one read of the
    socket brought), all that one read brought at once: urllib3 and http.client take it one chunk
    at a time (one token each, ~5 us of Python apiece, a tenth of a burst's CPU). At its end,
    `on_end()` (the connection may serve another request) when nothing came after it; a malformed or
    cut body is a ProtocolError after the whole chunks before it."""
    buffer = b""
    while True:
        at, pieces, end = split_chunks(buffer)
        if pieces:
            yield b"".join(pieces)
        if end is not None:
            if end == len(buffer):  # nothing after the body: the connection can be kept
                on_end()
            return
        buffer = buffer[at:]
        if pieces:
            continue  # what is left may be a malformed chunk: said now, not after another read
        data = source.read1()
        if not data:
            raise ProtocolError("the model server closed the answer before its end")
        buffer += data


def split_chunks(buffer):
    """The whole chunks' data at the start of `buffer`: (where the rest starts, [data...], where the
    body ends or None). Raises ProtocolError at a malformed chunk, once the good ones are taken."""
    at, pieces = 0, []
    while (line_end := buffer.find(b"\r\n", at)) >= 0:
        try:
            size = int(buffer[at:line_end].split(b";", 1)[0], 16)
        except ValueError:
            size = -1
        if size == 0:  # the last chunk: then trailers (none, in practice) and an empty line
            end = buffer.find(b"\r\n\r\n", line_end)
            return at, pieces, (end + 4 if end >= 0 else None)
        if size > 0 and len(buffer) < line_end + 4 + size:
            break  # the rest of this chunk is still to come
        if size < 0 or buffer[line_end + 2 + size:line_end + 4 + size] != b"\r\n":
            if pieces:  # the good chunks first; the error on the next read
                break
            raise ProtocolError("a malformed chunk from the model server")
        pieces.append(buffer[line_end + 2:line_end + 2 + size])
        at = line_end + 4 + size
    return at, pieces, None
