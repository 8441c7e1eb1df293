"""Fixtures of the security suite: one live app under gunicorn per module, over the session's
PostgreSQL, and a fresh database for each test."""
import pytest

from live import LiveServer


@pytest.fixture(scope="module")
def live_server(pg_url, fake_ollama):
    """gunicorn with two workers over the suite's PostgreSQL; tables are emptied per test by the
    `database_url` fixture (request it, or `fresh_db`, in each test)."""
    server = LiveServer(pg_url, fake_ollama.url, workers=2).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_db(database_url):
    return database_url
