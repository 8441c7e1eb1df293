"""Shared pieces of the security suite: a live gunicorn (two workers, as shipped) and browser-like clients."""
import re

import pytest
import requests

from live import LiveServer

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


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
