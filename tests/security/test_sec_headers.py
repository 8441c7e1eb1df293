"""Whom the app believes, and what it tells browsers (issue 9, items 8 and 15), under gunicorn:
- X-Forwarded-* counts only from a peer in TRUSTED_PROXY_NETWORKS, so a client that reaches the
  app's port directly cannot pick a new address per attempt and dodge the per-address limit;
- Strict-Transport-Security on HTTPS requests (here: via the trusted proxy's X-Forwarded-Proto),
  HSTS_SECONDS=0 turns it off;
- Cache-Control: no-store on everything carrying a conversation, a message or a token (everything
  but /static)."""
import re

import pytest
import requests

from helpers import PASSWORD, csrf, make_user, page_sign_in
from live import LiveServer, login, sse_events


@pytest.fixture
def start(pg_url, fake_ollama):
    servers = []

    def run(**env):
        servers.append(LiveServer(pg_url, fake_ollama.url, workers=2, **env).start())
        return servers[-1]
    yield run
    for server in servers:
        server.stop()


def _fail_sign_ins(base, count, forwarded_for):
    return [requests.post(base + "/auth/login", data={"username": f"nobody{n}", "password": "wrong"},
                          headers={"X-Forwarded-For": forwarded_for(n)}, timeout=30).status_code
            for n in range(count)]


def test_forwarded_headers_count_only_from_trusted_proxy_networks(app, fresh_db, start):
    make_user(app)
    limits = {"LOGIN_LIMIT_PER_ADDRESS": "3 per minute", "TRUSTED_PROXIES": 1}
    # The proxy is somewhere else: this peer (127.0.0.1) is a client that reached the port directly.
    direct = start(TRUSTED_PROXY_NETWORKS="10.0.0.0/8", **limits)
    statuses = _fail_sign_ins(direct.url, 5, lambda n: f"203.0.113.{n}")
    assert statuses == [400, 400, 400, 429, 429]  # a new forged address each time does not help
    https = requests.get(direct.url + "/health", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    assert "Strict-Transport-Security" not in https.headers

    # The proxy (this peer) is trusted: its X-Forwarded-For is the client, whose limit is its own.
    behind = start(TRUSTED_PROXY_NETWORKS="127.0.0.1/32, ::1", **limits)
    statuses = _fail_sign_ins(behind.url, 4, lambda n: "198.51.100.7")
    assert statuses == [400, 400, 400, 429]
    assert _fail_sign_ins(behind.url, 1, lambda n: "198.51.100.8") == [400]

    # TRUSTED_PROXIES alone, no networks: nobody is believed.
    nobody = start(LOGIN_LIMIT_PER_ADDRESS="2 per minute", TRUSTED_PROXIES=1)
    statuses = _fail_sign_ins(nobody.url, 3, lambda n: f"192.0.2.{n}")
    assert statuses[-1] == 429


def test_hsts_over_https_only_and_configurable(app, fresh_db, start):
    make_user(app)
    server = start(TRUSTED_PROXIES=1, TRUSTED_PROXY_NETWORKS="127.0.0.1/32")
    secure = {"X-Forwarded-Proto": "https"}
    for path in ("/health", "/login", "/static/js/app.js", "/no-such-page"):
        response = requests.get(server.url + path, headers=secure, timeout=10)
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000", path
        assert "Strict-Transport-Security" not in requests.get(server.url + path, timeout=10).headers
    off = start(TRUSTED_PROXIES=1, TRUSTED_PROXY_NETWORKS="127.0.0.1/32", HSTS_SECONDS=0)
    assert "Strict-Transport-Security" not in requests.get(off.url + "/login", headers=secure, timeout=10).headers


def test_no_store_on_everything_that_carries_conversations_or_tokens(app, fresh_db, live_server, ollama):
    make_user(app)
    base = live_server.url
    auth = login(base, "alice", PASSWORD)
    turn = requests.post(base + "/chat/", json={"prompt": "hello"}, headers=auth, timeout=30)
    conversation, message = turn.json()["conversation_id"], turn.json()["message_id"]
    api = [turn,
           requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}, timeout=30),
           requests.get(base + "/conversations", headers=auth, timeout=10),
           requests.get(f"{base}/conversations/{conversation}", headers=auth, timeout=10),
           requests.get(f"{base}/conversations/{conversation}/messages/{message}", headers=auth, timeout=10),
           requests.get(f"{base}/conversations/{conversation}/export", headers=auth, timeout=10),
           requests.get(f"{base}/conversations/999", headers=auth, timeout=10)]
    stream = requests.post(base + "/chat/", json={"prompt": "again", "conversation_id": conversation,
                                                 "stream": True}, headers=auth, stream=True, timeout=30)
    list(sse_events(stream))
    browser, _ = page_sign_in(base, "alice", PASSWORD)
    page = browser.get(f"{base}/c/{conversation}", timeout=10)
    pages = [page, browser.get(base + "/", timeout=10), browser.get(base + "/settings", timeout=10),
             browser.get(base + "/sidebar", timeout=10), browser.get(f"{base}/c/{conversation}/export", timeout=10),
             browser.get(f"{base}/c/{conversation}/m/{message}/events", timeout=10),
             browser.post(f"{base}/c/{conversation}/rename", timeout=10, headers={"HX-Request": "true"},
                          data={"title": "t", "csrf_token": csrf(browser, f"{base}/c/{conversation}")})]
    for response in api + [stream] + pages:
        assert response.headers.get("Cache-Control") == "no-store", (response.url, response.headers)
    # Static files stay cacheable (revalidated by ETag as before).
    script = re.search(r'src="(/static/[^"]+\.js)"', page.text).group(1)
    assert "no-store" not in requests.get(base + script, timeout=10).headers.get("Cache-Control", "")
