"""gunicorn's HTTP/1 response, with the status line and headers sent together with the first body
bytes: one send() instead of two.

gunicorn writes a response's head and its body with two sendall()s. Each is a system call, a TCP
segment and a wake-up of the client; on the loopback and container networks this app runs on, the
kernel's side of a send is most of its cost (a py-spy profile of one-client turns: the head's send
2.6 % of the worker's samples). A whole JSON answer, and the first event of a stream, now leave in
one. The head is held only inside one write() and sent at its end whatever happens in between
(a HEAD response, a body cut at Content-Length, an empty chunk), so every other path (sendfile,
close, error pages) sees gunicorn's own order: head first, then whatever follows.

Installed by each worker (webapp/gunicorn_conf.py, post_worker_init) through `wsgi.create`'s
module-level `Response`; the body framing goes through `_emit_body`, the hook gunicorn keeps for it.
"""
from gunicorn import util
from gunicorn.http import wsgi


class OneSendResponse(wsgi.Response):
    _holding = False
    _head = b""

    def write(self, arg):
        self._holding = True
        try:
            super().write(arg)
        finally:
            self._holding = False
            self._send_head()

    def send_headers(self):
        if not self._holding or self.headers_sent:
            return super().send_headers()
        real = self.sock
        self.sock = _Collect()  # gunicorn builds the head and "sends" it here
        try:
            super().send_headers()
        finally:
            self._head, self.sock = self.sock.data, real

    def _emit_body(self, data):
        head, self._head = self._head, b""
        if not head:
            return super()._emit_body(data)
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(head + data)

    def _send_head(self):
        head, self._head = self._head, b""
        if head:
            util.write(self.sock, head)


class _Collect:
    data = b""

    def sendall(self, data):
        self.data += data


def install():
    wsgi.Response = OneSendResponse
