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
    # RFC 6749 §5.1: a token is never cached.
    assert response.headers["Cache-Control"] == "no-store" and response.headers["Pragma"] == "no-cache"
    # grant_type may be left out, as the seed's FastAPI form allowed.
    assert client.post("/auth/login", data={"username": "alice", "password": "correct horse battery"}
                       ).status_code == 200


def token_error(response, status, error):
    """An RFC 6749 §5.2 error: a string code, a description, our request id, never cached."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == error and isinstance(body["error_description"], str) and body["error_description"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["Cache-Control"] == "no-store"
    return body


def test_bad_credentials_are_invalid_grant_and_do_not_reveal_whether_user_exists(client, user):
    wrong_password = client.post("/auth/login", data={"username": "alice", "password": "nope-nope-nope"})
    no_such_user = client.post("/auth/login", data={"username": "bob", "password": "nope-nope-nope"})
    first = token_error(wrong_password, 400, "invalid_grant")
    second = token_error(no_such_user, 400, "invalid_grant")
    assert first["error_description"] == second["error_description"]


def test_malformed_token_requests_are_invalid_request_or_unsupported_grant(client, user):
    body = token_error(client.post("/auth/login", data={"username": "alice"}), 400, "invalid_request")
    assert "password" in body["error_description"]
    token_error(client.post("/auth/login", data={"username": "alice", "password": "x", "grant_type": "client"}),
                400, "unsupported_grant_type")
    token_error(client.post("/auth/login", data={"username": "alice", "password": "x",
                                                 "grant_type": "client_credentials"}), 400, "unsupported_grant_type")
    # RFC 6749 §3.2: a parameter sent twice is refused, even when each value would be right.
    for repeated in ({"username": ["alice", "alice"], "password": "correct horse battery"},
                     {"username": "alice", "password": ["correct horse battery"] * 2},
                     {"username": "alice", "password": "correct horse battery", "grant_type": ["password"] * 2}):
        body = token_error(client.post("/auth/login", data=repeated), 400, "invalid_request")
        assert "repeated" in body["error_description"]
    token_error(client.post("/auth/login", json={"username": "alice", "password": "correct horse battery"}),
                400, "invalid_request")  # the token endpoint takes a form, not JSON


def test_missing_forged_and_expired_tokens_are_401_with_rfc6750_challenges(app, client, user):
    missing = client.post("/chat/", json={"prompt": "hi"})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="api"'  # no token: no error code (§3.1)
    assert client.get("/conversations", headers={"Authorization": "Basic YTpi"}).headers[
        "WWW-Authenticate"] == 'Bearer realm="api"'
    forged = jwt.encode({"sub": "1", "ver": 1, "iat": int(time.time()), "exp": int(time.time()) + 60},
                        "some-other-secret-key-of-sufficient-length", algorithm="HS256")
    response = client.post("/chat/", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == \
        'Bearer realm="api", error="invalid_token", error_description="token is invalid"'
    expired = jwt.encode({"sub": "1", "ver": 1, "iat": int(time.time()) - 120, "exp": int(time.time()) - 60},
                         app.config["SECRET_KEY"], algorithm="HS256")
    response = client.post("/chat/", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "expired" in response.get_json()["error"]["message"]
    assert response.headers["WWW-Authenticate"] == \
        'Bearer realm="api", error="invalid_token", error_description="token has expired"'
    garbage = client.get("/conversations", headers={"Authorization": "Bearer not.a.token"})
    assert garbage.status_code == 401 and 'error="invalid_token"' in garbage.headers["WWW-Authenticate"]


def test_a_token_is_decoded_once_but_its_expiry_is_checked_on_every_use(app, client, user, monkeypatch):
    """The signature check is remembered per token (webapp/auth/tokens._decoded); the expiry is not."""
    from webapp.auth import tokens

    token = login_token(client)
    headers = {"Authorization": f"Bearer {token}"}
    decoded = []
    real_decode = jwt.decode
    monkeypatch.setattr(tokens.jwt, "decode", lambda *a, **k: decoded.append(a[0]) or real_decode(*a, **k))
    tokens._decoded.cache_clear()
    for _ in range(3):
        assert client.get("/conversations", headers=headers).status_code == 200
    assert decoded == [token]
    # The same remembered token, an hour and a second later: expired, though never decoded again.
    later = time.time() + 3601
    monkeypatch.setattr(tokens.time, "time", lambda: later)
    response = client.get("/conversations", headers=headers)
    assert response.status_code == 401 and decoded == [token]
    assert response.headers["WWW-Authenticate"] == \
        'Bearer realm="api", error="invalid_token", error_description="token has expired"'


def test_a_signed_token_naming_an_impossible_user_id_is_invalid_not_a_500(app, client, user):
    """Only a holder of SECRET_KEY can sign one, but the answer must still be 401, not PostgreSQL's
    integer overflow."""
    now = int(time.time())
    token = jwt.encode({"sub": str(2**40), "ver": 1, "iat": now, "exp": now + 60, "jti": "x" * 32},
                       app.config["SECRET_KEY"], algorithm="HS256")
    response = client.get("/conversations", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]


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


def test_logout_all_ends_every_token_and_browser_session(app, client, user):
    """Sign out everywhere (POST /auth/revoke used to do this; it is RFC 7009 now: test_revoke.py)."""
    from helpers import sign_in
    first, second = login_token(client), login_token(client)
    browser = app.test_client()
    sign_in(browser)
    assert browser.get("/settings").status_code == 200
    ended = client.post("/auth/logout-all", headers={"Authorization": f"Bearer {first}"})
    assert ended.status_code == 204
    for token in (first, second):
        response = client.get("/conversations", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401 and "no longer valid" in response.get_json()["error"]["message"]
    assert browser.get("/settings").status_code == 302  # the page session ended too
    assert client.post("/auth/logout-all").status_code == 401
    assert client.get("/conversations", headers={"Authorization": f"Bearer {login_token(client)}"}).status_code == 200
