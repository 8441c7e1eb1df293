"""Fixtures: a real PostgreSQL (and SQLite files), the Ollama-protocol test server, apps and clients.

The PostgreSQL schema is made once per run by the migrations themselves (`flask db upgrade`), and
every test starts from empty tables, so tests are isolated and the migrations are exercised.
"""
import os
import time

import pytest
from sqlalchemy import text

from ollama_server import FakeOllama
from pg import TestDatabase

os.environ.pop("DATABASE_URL", None)  # never let a developer's .env point the suite at real data
os.environ.setdefault("SECRET_KEY", "test-secret-key-that-is-long-enough-0123456789")

TABLES = ("messages", "conversations", "user_sessions", "setup_claims", "users", "rate_limit_hits")
PASSWORD = "correct horse battery"


@pytest.fixture(scope="session")
def pg_database():
    database = TestDatabase()
    yield database
    database.drop()


@pytest.fixture(scope="session")
def pg_url(pg_database):
    """The session's PostgreSQL database, upgraded to the newest migration."""
    from flask_migrate import upgrade
    app = _make_app(pg_database.url, "http://127.0.0.1:9")
    with app.app_context():
        upgrade()
    return pg_database.url


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


def _make_app(database_url, ollama_url, **overrides):
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
    app = _make_app(url, "http://127.0.0.1:9")
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


both_databases = pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)


@pytest.fixture
def make_app(database_url, ollama):
    apps = []

    def factory(**overrides):
        app = _make_app(database_url, ollama.url, **overrides)
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


def wait_idle(app, timeout=10.0):
    """Let background generations finish before the tables are emptied for the next test."""
    registry = app.extensions.get("generations")
    deadline = time.monotonic() + timeout
    while registry is not None and registry.ids() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def client(app):
    return app.test_client()


def make_user(app, username="alice", password=PASSWORD, **kwargs):
    from webapp.auth.passwords import create_user
    with app.app_context():
        user = create_user(username, password, **kwargs)
        return user.id


@pytest.fixture
def user(app):
    return make_user(app)


def login_token(client, username="alice", password=PASSWORD):
    response = client.post("/auth/login", data={"username": username, "password": password})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["access_token"]


@pytest.fixture
def token(client, user):
    return login_token(client)


@pytest.fixture
def auth(token):
    return {"Authorization": f"Bearer {token}"}
