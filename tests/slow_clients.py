"""Slowloris: sockets that send a request one piece a second and never finish it.

Half of them send a header block that never ends; the other half send complete headers for a 100 kB
body, 16 kB of it at once (past any small write buffer of a proxy in between, so an unbuffered proxy
hands the request on to gunicorn) and then four bytes a second.
"""
import socket
import threading


class SlowClient:
    def __init__(self, port, body):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.body = body
        if body:
            self.sock.sendall(b"POST /auth/login HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/x-www-form-urlencoded\r\n"
                              b"Content-Length: 100000\r\n\r\nusername=" + b"a" * 16000)
        else:
            self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        self.pieces = 1

    def trickle(self):
        self.sock.sendall(b"aaaa" if self.body else f"X-Slow-{self.pieces}: 1\r\n".encode())
        self.pieces += 1

    def close(self):
        self.sock.close()


class SlowClients:
    """`with SlowClients(port, n) as attack:` n slow sockets, one piece each every `every` seconds.

    `errors` collects failures to send (the server closed a slow socket); the trickling stops at the
    first one."""

    def __init__(self, port, count, every=1.0):
        self.port, self.count, self.every = port, count, every
        self.clients, self.errors = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.clients = [SlowClient(self.port, body=i % 2 == 1) for i in range(self.count)]
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            for client in self.clients:
                try:
                    client.trickle()
                except OSError as error:
                    self.errors.append(error)
                    return

    def min_pieces(self):
        return min(client.pieces for client in self.clients)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        for client in self.clients:
            client.close()
