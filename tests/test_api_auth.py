"""POST /auth/login and bearer-token checks."""
import time

import jwt

from helpers import both_databases, login_token

pytestmark = both_databases


def test_login_returns_bearer_token(client, user):
    response = client.post("/auth/login", data={"username": "Alice", "password": "correct horse battery",
                                                "grant_type": "password", "scope": ""})
    assert response.status_code == 200
    body = response.get_json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert body["access_token"].count(".") == 2


def test_bad_credentials_do_not_reveal_whether_user_exists(client, user):
    wrong_password = client.post("/auth/login", data={"username": "alice", "password": "nope-nope-nope"})
    no_such_user = client.post("/auth/login", data={"username": "bob", "password": "nope-nope-nope"})
    for response in (wrong_password, no_such_user):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert wrong_password.get_json()["error"]["message"] == no_such_user.get_json()["error"]["message"]
    assert wrong_password.get_json()["error"]["code"] == "invalid_credentials"


def test_login_form_fields_are_required(client, user):
    response = client.post("/auth/login", data={"username": "alice"})
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] == "password"
    response = client.post("/auth/login", data={"username": "alice", "password": "x", "grant_type": "client"})
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "grant_type"


def test_missing_forged_and_expired_tokens_are_401(app, client, user):
    assert client.post("/chat/", json={"prompt": "hi"}).status_code == 401
    forged = jwt.encode({"sub": "1", "ver": 1, "iat": int(time.time()), "exp": int(time.time()) + 60},
                        "some-other-secret-key-of-sufficient-length", algorithm="HS256")
    response = client.post("/chat/", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    expired = jwt.encode({"sub": "1", "ver": 1, "iat": int(time.time()) - 120, "exp": int(time.time()) - 60},
                         app.config["SECRET_KEY"], algorithm="HS256")
    response = client.post("/chat/", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "expired" in response.get_json()["error"]["message"]
    garbage = client.get("/conversations", headers={"Authorization": "Bearer not.a.token"})
    assert garbage.status_code == 401


def test_password_change_invalidates_old_tokens(app, client, user):
    token = login_token(client)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/conversations", headers=headers).status_code == 200
    with app.app_context():
        from webapp.auth.accounts import find_user, set_password
        set_password(find_user("alice"), "a brand new password")
    assert client.get("/conversations", headers=headers).status_code == 401


def test_request_id_is_echoed_or_made(client):
    response = client.get("/health", headers={"X-Request-ID": "trace-123"})
    assert response.headers["X-Request-ID"] == "trace-123"
    made = client.get("/health").headers["X-Request-ID"]
    assert len(made) == 32
    hostile = client.get("/health", headers={"X-Request-ID": "bad id with spaces <script>"}).headers["X-Request-ID"]
    assert hostile != "bad id with spaces <script>"


def test_wrong_method_says_which_are_allowed(client):
    response = client.put("/conversations")
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    page = client.put("/login")
    assert page.status_code == 405 and "POST" in page.headers["Allow"]


def test_revoke_ends_every_token_and_browser_session(app, client, user):
    from helpers import sign_in
    first, second = login_token(client), login_token(client)
    browser = app.test_client()
    sign_in(browser)
    assert browser.get("/settings").status_code == 200
    revoked = client.post("/auth/revoke", headers={"Authorization": f"Bearer {first}"})
    assert revoked.status_code == 204
    for token in (first, second):
        response = client.get("/conversations", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401 and "no longer valid" in response.get_json()["error"]["message"]
    assert browser.get("/settings").status_code == 302  # the page session ended too
    assert client.post("/auth/revoke").status_code == 401
    assert client.get("/conversations", headers={"Authorization": f"Bearer {login_token(client)}"}).status_code == 200
