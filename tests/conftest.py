"""Fixtures: a real PostgreSQL (and SQLite files), the Ollama-protocol test server, apps and clients.

The PostgreSQL schema is made once per run by the migrations themselves (`flask db upgrade`), and
every test starts from empty tables, so tests are isolated and the migrations are exercised.
"""
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from helpers import build_app, login_token, make_user, wait_idle
from live import LiveServer
from ollama_server import FakeOllama
from pg import TestDatabase

os.environ.pop("DATABASE_URL", None)  # never let a developer's .env point the suite at real data
os.environ.setdefault("SECRET_KEY", "test-secret-key-that-is-long-enough-0123456789")

TABLES = ("idempotency_keys", "messages", "conversations", "api_keys", "user_sessions", "setup_claims", "users",
          "rate_limit_hits", "revoked_tokens")




@pytest.fixture(scope="session")
def pg_database():
    database = TestDatabase()
    yield database
    database.drop()


@pytest.fixture(scope="session")
def pg_url(pg_database):
    """The session's PostgreSQL database, upgraded to the newest migration."""
    from flask_migrate import upgrade
    app = build_app(pg_database.url, "http://127.0.0.1:9")
    with app.app_context():
        upgrade()
    return pg_database.url


@pytest.fixture
def empty_pg_url(pg_database):
    """A second database on the suite's PostgreSQL with no schema at all: `flask db upgrade` from nothing."""
    database = pg_database.another()
    yield database.url
    database.drop()


@pytest.fixture(scope="session")
def fake_ollama():
    server = FakeOllama().start()
    yield server
    server.stop()


@pytest.fixture
def ollama(fake_ollama):
    fake_ollama.reset()
    yield fake_ollama
    fake_ollama.reset()




def truncate(url):
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError
    engine = create_engine(url)
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
            break
        except OperationalError as exc:  # a live server's worker booting mid-truncate: deadlock, retry
            if "deadlock" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2)
    engine.dispose()


def sqlite_url(tmp_path):
    """A migrated SQLite file of its own for one test."""
    from flask_migrate import upgrade
    url = f"sqlite:///{tmp_path / 'test.db'}"
    app = build_app(url, "http://127.0.0.1:9")
    with app.app_context():
        upgrade()
    return url


@pytest.fixture(params=["postgresql"])
def database_url(request, tmp_path):
    """PostgreSQL by default; modules opt into SQLite too with `pytestmark = both_databases`."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    url = request.getfixturevalue("pg_url")
    truncate(url)
    yield url


@pytest.fixture
def make_app(database_url, ollama):
    apps = []

    def factory(**overrides):
        app = build_app(database_url, ollama.url, **overrides)
        apps.append(app)
        return app
    yield factory
    for app in apps:
        wait_idle(app)
        with app.app_context():
            from webapp.extensions import db
            db.session.remove()
            db.engine.dispose()
        limit_engine = app.extensions.get("auth_limit_engine")  # the sign-in limits' own small pool
        if limit_engine is not None:
            limit_engine.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def user(app):
    return make_user(app)


@pytest.fixture
def alice(app):
    """A user, as the service takes one: inside a request context, loaded by its session."""
    make_user(app)
    with app.test_request_context():
        from webapp.extensions import db
        from webapp.models import User
        yield db.session.get(User, 1)


@pytest.fixture
def token(client, user):
    return login_token(client)


@pytest.fixture
def auth(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def browser(client, user):
    """A signed-in browser session (test client) and its CSRF token."""
    from helpers import sign_in
    client.csrf = sign_in(client)
    return client


# ---- real Chromium (Debian's), driven by Playwright, against gunicorn ------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def servers(app, ollama, database_url):
    """Start gunicorn servers (as shipped) on the test database; all are stopped at the end."""
    started = []

    def start(**env):
        server = LiveServer(database_url, ollama.url, **env).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(app, ollama, database_url):
    make_user(app)
    live = LiveServer(database_url, ollama.url, workers=2).start()
    yield live
    live.stop()


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.accept()))
    page.console = []
    page.on("console", lambda message: page.console.append(message.text))
    page.base = server.url
    yield page
    context.close()
    # Every file a page asks for exists (stylesheets, scripts, the icon browsers fetch by themselves).
    assert not [m for m in page.console if "404" in m], page.console
