"""Sign-in details: where `next` may lead, sign-up switched off, sessions after sign-out."""
import pytest

from helpers import PASSWORD, csrf_of, sign_in


@pytest.mark.parametrize("target", ["/\t/evil.example", "/\n/evil.example", "/%09/x\t", "///evil.example",
                                    "http:/\\evil.example", " //evil.example", "/ok\x00"])
def test_next_refuses_whitespace_and_control_tricks(client, user, target):
    token = csrf_of(client)
    response = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token,
                                           "next": target})
    assert response.headers["Location"] == "/"


def test_next_keeps_the_query_string(client, user):
    response = client.get("/sidebar?q=abc")
    assert response.headers["Location"] == "/login?next=/sidebar?q%3Dabc"
    login_page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert 'name="next" value="/sidebar?q=abc"' in login_page
    token = csrf_of(client)
    back = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token,
                                       "next": "/sidebar?q=abc"})
    assert back.headers["Location"] == "/sidebar?q=abc"


def test_signed_in_visitors_skip_the_sign_in_page(client, user):
    sign_in(client)
    response = client.get("/login?next=/settings")
    assert response.status_code == 302 and response.headers["Location"] == "/settings"


def test_closed_sign_up_says_so(make_app):
    client = make_app(ALLOW_SIGNUP=False).test_client()
    page = client.get("/register")
    assert page.status_code == 404 and "Sign-up is closed" in page.get_data(as_text=True)
    token = csrf_of(client)
    attempt = client.post("/register", data={"username": "eve", "password": "x" * 12, "confirm": "x" * 12,
                                             "csrf_token": token})
    assert attempt.status_code == 404
    from webapp.auth.accounts import find_user
    with client.application.app_context():
        assert find_user("eve") is None


def test_sign_out_ends_the_session_for_good(client, user):
    token = sign_in(client)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    response = client.get("/c/1")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")


def test_settings_page_needs_sign_in_and_checks_length(client, user):
    assert client.get("/settings").headers["Location"] == "/login?next=/settings"
    token = sign_in(client)
    short = client.post("/settings", data={"current_password": PASSWORD, "new_password": "short",
                                           "confirm": "short", "csrf_token": token})
    assert short.status_code == 422 and "at least" in short.get_data(as_text=True)
