"""The shipped Caddy config (deploy/Caddyfile + deploy/app.caddy) in front of a real gunicorn.

Caddy runs the files as shipped; only the listen address, the upstream address and the admin endpoint
are rewritten (to loopback ports). It is the Caddy of requirements-dev.txt (`caddyserver`, the same
minor version as the compose file's `caddy:2.11` image); without a caddy binary these tests skip.

Proves the issue's slowloris finding is closed by the deployment: 50 sockets trickling headers or
bodies leave /health answering at once through the proxy, while gunicorn itself has fewer threads
than there are slow sockets. And that answers still stream through it token by token.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import PASSWORD, make_user
from live import LiveServer, free_port, login, sse_events

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

SLOW_SOCKETS = 50          # half trickle headers, half announce a body and trickle it
ATTACK_SECONDS = 6.0       # well under read_header (10 s), so Caddy keeps every slow socket open
GUNICORN_THREADS = 8       # x 2 workers = 16 threads, far fewer than the slow sockets


def caddy_binary():
    """The venv's caddy (requirements-dev.txt) first, then one on PATH; None if none is new enough."""
    candidates = [Path(sys.executable).parent / "caddy", shutil.which("caddy")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            out = subprocess.run([str(candidate), "version"], capture_output=True, text=True).stdout
            match = re.match(r"v2\.(\d+)", out)
            if match and int(match.group(1)) >= 7:  # request_buffers needs 2.7+
                return str(candidate)
    return None


CADDY = caddy_binary()
pytestmark = pytest.mark.skipif(CADDY is None, reason="no caddy >= 2.7 (pip install -r requirements-dev.txt)")


def shipped_config(directory, listen_port, upstream_port):
    """deploy/ copied with its loopback addresses filled in; every other line as shipped."""
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    app = (DEPLOY / "app.caddy").read_text()
    assert caddyfile.count("admin localhost:2019") == 1 and caddyfile.count("\n:80 {") == 1
    assert app.count("reverse_proxy app:8000 {") == 1
    caddyfile = caddyfile.replace("admin localhost:2019", "admin off")
    caddyfile = caddyfile.replace("\n:80 {", f"\n:{listen_port} {{\n\tbind 127.0.0.1")
    app = app.replace("reverse_proxy app:8000 {", f"reverse_proxy 127.0.0.1:{upstream_port} {{")
    (directory / "Caddyfile").write_text(caddyfile)
    (directory / "app.caddy").write_text(app)
    return directory / "Caddyfile"


class Caddy:
    def __init__(self, directory, upstream_port, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = shipped_config(directory, self.port, upstream_port)
        self.env = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory),
                    "XDG_CONFIG_HOME": str(directory), "DOMAIN": "", **env}
        self.log = open(directory / "caddy.log", "w")
        self.process = subprocess.Popen([CADDY, "run", "--config", str(self.config), "--adapter", "caddyfile"],
                                        env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("caddy exited: " + (directory / "caddy.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("caddy did not start")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def stack(app, ollama, database_url, tmp_path):
    """gunicorn (two workers, production config) behind the shipped Caddy config."""
    make_user(app)
    server = LiveServer(database_url, ollama.url, workers=2, GUNICORN_THREADS=GUNICORN_THREADS,
                        TRUSTED_PROXIES=1, TRUSTED_PROXY_NETWORKS="127.0.0.1/32").start()
    caddy = None
    try:
        caddy = Caddy(tmp_path, server.port)
        yield server, caddy
    finally:
        if caddy:
            caddy.stop()
        server.stop()


class SlowClient:
    """One slowloris socket: a request that never finishes, one piece every second."""

    def __init__(self, port, body):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.body = body
        if body:  # complete headers, 16 kB of a 100 kB body at once (past any write buffer between
            # Caddy and gunicorn, so an unbuffered proxy hands it on), then a few bytes at a time
            self.sock.sendall(b"POST /auth/login HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/x-www-form-urlencoded\r\n"
                              b"Content-Length: 100000\r\n\r\nusername=" + b"a" * 16000)
        else:     # a header block that never ends
            self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        self.sent = 1

    def trickle(self):
        self.sock.sendall(b"aaaa" if self.body else f"X-Slow-{self.sent}: 1\r\n".encode())
        self.sent += 1

    def close(self):
        self.sock.close()


def test_slowloris_through_the_proxy_leaves_health_answering(stack):
    server, caddy = stack
    slow = [SlowClient(caddy.port, body=i % 2 == 1) for i in range(SLOW_SOCKETS)]
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            for client in slow:
                client.trickle()  # raises if Caddy closed a slow socket: the attack must stay on
    errors = []
    trickler = threading.Thread(target=lambda: _capture(trickle, errors), daemon=True)
    trickler.start()
    timings, statuses = [], []
    try:
        time.sleep(1.5)  # every slow socket has sent at least one more piece: the attack is on
        deadline = time.monotonic() + ATTACK_SECONDS - 1.5
        while time.monotonic() < deadline:
            start = time.monotonic()
            response = requests.get(caddy.url + "/health", timeout=5)
            timings.append(time.monotonic() - start)
            statuses.append(response.status_code)
            time.sleep(0.25)
        # A whole request with a body also passes while the slow bodies are held at the proxy.
        start = time.monotonic()
        auth = login(caddy.url, "alice", PASSWORD)
        login_seconds = time.monotonic() - start
        assert requests.get(caddy.url + "/conversations", headers=auth, timeout=5).status_code == 200
    finally:
        stop.set()
        trickler.join(timeout=5)
        for client in slow:
            client.close()
    assert errors == [], f"a slow socket was closed during the attack: {errors[:1]}"
    assert min(client.sent for client in slow) >= ATTACK_SECONDS - 2
    assert statuses and set(statuses) == {200}, statuses
    assert len(timings) >= 8
    assert max(timings) < 2.0, timings
    assert login_seconds < 3.0
    print(f"\nslowloris x{SLOW_SOCKETS} via caddy: /health n={len(timings)} "
          f"median={sorted(timings)[len(timings) // 2] * 1000:.0f}ms max={max(timings) * 1000:.0f}ms; "
          f"login {login_seconds * 1000:.0f}ms")


def _capture(function, errors):
    try:
        function()
    except OSError as error:
        errors.append(error)


def test_answer_streams_through_the_proxy_token_by_token(stack, ollama):
    server, caddy = stack
    auth = login(caddy.url, "alice", PASSWORD)
    words = [f"w{i} " for i in range(8)]
    ollama.script(chunks=words, delay=0.4)  # about 3 s from the first word to the last
    start = time.monotonic()
    response = requests.post(caddy.url + "/chat/", json={"prompt": "count", "stream": True},
                             headers=auth, stream=True, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    arrivals, done_at, text = [], None, ""
    for name, data in sse_events(response):
        if name == "token":
            arrivals.append(time.monotonic() - start)
            text += data["text"]
        elif name == "done":
            done_at = time.monotonic() - start
            break
    response.close()
    assert text == "".join(words)
    assert done_at is not None
    # The first word reached the client long before the answer ended, and the words came in steps.
    assert arrivals[0] < done_at - 2.0, (arrivals, done_at)
    assert len({round(t, 1) for t in arrivals}) >= 5, arrivals


def test_port_80_redirects_to_https_when_a_domain_is_set(app, tmp_path):
    """With DOMAIN set (the `https` profile), the plain-HTTP proxy only redirects."""
    caddy = Caddy(tmp_path, free_port(), DOMAIN="chat.example.com")
    try:
        response = requests.get(caddy.url + "/conversations?x=1", allow_redirects=False, timeout=5)
    finally:
        caddy.stop()
    assert response.status_code == 308
    assert response.headers["Location"] == "https://chat.example.com/conversations?x=1"


def test_https_config_as_caddy_reads_it():
    """deploy/Caddyfile.https, adapted by Caddy itself: 443 with a certificate for DOMAIN, the same
    deadlines, no plain-HTTP listener of its own (port 80 belongs to the `proxy` service)."""
    import json
    adapted = subprocess.run([CADDY, "adapt", "--config", str(DEPLOY / "Caddyfile.https")],
                             env={**os.environ, "DOMAIN": "chat.example.com"}, capture_output=True, text=True)
    assert adapted.returncode == 0, adapted.stderr
    config = json.loads(adapted.stdout)
    servers = list(config["apps"]["http"]["servers"].values())
    assert [server["listen"] for server in servers] == [[":443"]]
    server = servers[0]
    assert server["read_header_timeout"] == 10e9 and server["read_timeout"] == 60e9  # headers; whole request
    assert "write_timeout" not in server
    assert server["automatic_https"] == {"disable_redirects": True}
    assert server["routes"][0]["match"] == [{"host": ["chat.example.com"]}]
    policy, = config["apps"]["tls"]["automation"]["policies"]
    assert policy["subjects"] == ["chat.example.com"]
    assert policy["issuers"][0]["module"] == "acme"
    proxy = json.dumps(server["routes"])
    assert '"request_buffers": 1000000' in proxy and "response_buffers" not in proxy
