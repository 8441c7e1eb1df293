"""Helpers the test modules share: plain functions and constants (fixtures live in conftest.py).
Test modules import from here, never from conftest or from each other."""
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

PASSWORD = "correct horse battery"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

# Modules (or tests) that should run on SQLite too: `pytestmark = both_databases`.
both_databases = pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)


def build_app(database_url, ollama_url, **overrides):
    """The app as the suite configures it: fast flushes and heartbeats, short LLM timeouts."""
    from webapp import create_app
    config = {
        "TESTING": True,
        "SQLALCHEMY_DATABASE_URI": database_url,
        "OLLAMA_URL": ollama_url,
        "LLM_BACKEND": "ollama",
        "DEFAULT_MODEL": "tinyllama",
        "LLM_CONNECT_TIMEOUT": 1.0,
        "LLM_READ_TIMEOUT": 2.0,
        "OLLAMA_LOAD_TIMEOUT": 2.0,
        "STREAM_FLUSH_SECONDS": 0.05,
        "HEARTBEAT_SECONDS": 0.2,
        "STALE_AFTER_SECONDS": 2.0,
        "MODELS_CACHE_SECONDS": 0.0,
        "WTF_CSRF_ENABLED": True,
    }
    config.update(overrides)
    return create_app(config)


def wait_idle(app, timeout=10.0):
    """Let background generations finish before the tables are emptied for the next test."""
    registry = app.extensions.get("generations")
    deadline = time.monotonic() + timeout
    while registry is not None and registry.ids() and time.monotonic() < deadline:
        time.sleep(0.05)


def make_user(app, username="alice", password=PASSWORD, **kwargs):
    from webapp.auth.accounts import create_user
    with app.app_context():
        user = create_user(username, password, **kwargs)
        return user.id


def login_token(client, username="alice", password=PASSWORD):
    response = client.post("/auth/login", data={"username": username, "password": password})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["access_token"]


# ---- pages through the test client ---------------------------------------------------------------

def csrf_of(client, path="/login"):
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(client, username="alice", password=PASSWORD):
    token = csrf_of(client)
    response = client.post("/login", data={"username": username, "password": password, "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    return csrf_of(client, "/?new=1")


def htmx(browser):
    return {"HX-Request": "true", "X-CSRFToken": browser.csrf}


def send(browser, prompt, conversation_id=None, **headers):
    path = f"/c/{conversation_id}/messages" if conversation_id else "/c/new"
    return browser.post(path, data={"prompt": prompt, "csrf_token": browser.csrf}, headers=headers)


def read_sse(browser, path):
    body = browser.get(path).get_data(as_text=True)
    return re.findall(r"event: (\w+)\ndata: (.*)\n\n", body)


class Elements(HTMLParser):
    """What a browser would build from the HTML: tag names and their attributes."""

    def __init__(self, html):
        super().__init__()
        self.found = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


# ---- pages in real Chromium ----------------------------------------------------------------------

def sign_in_page(page, username="alice", password=PASSWORD, screenshot=None):
    from playwright.sync_api import expect
    page.goto(page.base + "/")
    expect(page).to_have_url(page.base + "/login?next=/")
    if screenshot:
        shoot(page, screenshot)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#prompt")).to_be_visible()


def ask(page, prompt):
    page.wait_for_selector("html[data-js-ready]", state="attached")  # Enter is handled by app.js
    page.locator("#prompt").fill(prompt)
    page.locator("#prompt").press("Enter")


def last_answer(page):
    return page.locator("article.message.assistant").last


def shoot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    time.sleep(0.3)  # let the sidebar's slide transition finish
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


class StaticPage:
    """One HTML page served from its own loopback port (so its own origin), in a thread: the foreign
    site a browser-based API client lives on. `.url` is the page, `.origin` what its fetches send."""

    def __init__(self, html):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        body = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                found = self.path.split("?")[0] == "/"  # the page reads its settings from the query
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.origin + "/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---- the security suite: a live app over real HTTP ------------------------------------------------

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(session, url):
    return CSRF.search(session.get(url, timeout=30).text).group(1)


def page_sign_in(base, username, password, remember=False, session=None):
    """Sign in through the page like a browser; returns (session, response)."""
    session = session or requests.Session()
    data = {"username": username, "password": password, "csrf_token": csrf(session, base + "/login")}
    if remember:
        data["remember"] = "1"
    return session, session.post(base + "/login", data=data, allow_redirects=False, timeout=30)


def api_sign_in(base, username, password, session=None):
    return (session or requests).post(base + "/auth/login", data={"username": username, "password": password},
                                      timeout=60)


def signed_in(session, base):
    """True when the session's cookies open the settings page (not a redirect to sign-in)."""
    response = session.get(base + "/settings", allow_redirects=False, timeout=30)
    return response.status_code == 200
