"""POST /auth/revoke is token revocation as RFC 7009 says: `token=` (a form) revokes that one access
token (its jti is denied until it expires) or that API key; every other token, key and browser
session of the account goes on. The answer is 200 for any token, live or not (§2.2: no oracle), and
a malformed request is RFC 6749 §5.2's 400 invalid_request. Signing out everywhere is
POST /auth/logout-all (test_api_auth). Checked with the test client on both databases, and live
under gunicorn with Authlib's revoke_token and with open streams on another server process."""
import threading
import time
from datetime import timedelta

import jwt
import openai
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session as AuthlibSession
from sqlalchemy import event, func, select

from helpers import PASSWORD, both_databases, login_token, make_user, sign_in
from live import login, sse_events

pytestmark = both_databases

LONG_ANSWER = dict(chunks=["word "] * 300, delay=0.1)  # ~30 s of tokens
ENDS_WITHIN = 5.0  # as for sign-out everywhere (webapp/stream_auth.py)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def revoke(client, token, **extra):
    return client.post("/auth/revoke", data={"token": token, **extra})


def refused(client, token):
    """RFC 6750 §3: a revoked token gets 401 with an invalid_token challenge."""
    response = client.get("/conversations", headers=bearer(token))
    return (response.status_code == 401
            and 'error="invalid_token"' in response.headers.get("WWW-Authenticate", ""))


def test_revoking_one_token_ends_that_token_only(app, client, user):
    first, second = login_token(client), login_token(client)
    browser = app.test_client()
    sign_in(browser)
    response = revoke(client, first, token_type_hint="access_token")
    assert response.status_code == 200 and response.get_json() == {}
    assert response.headers["Cache-Control"] == "no-store" and response.headers["Pragma"] == "no-cache"
    assert refused(client, first)
    assert client.get("/conversations", headers=bearer(first)).get_json()["error"]["message"] == "token was revoked"
    assert client.get("/conversations", headers=bearer(second)).status_code == 200  # the same person's other token
    assert browser.get("/settings").status_code == 200  # and their browser session
    assert revoke(client, first).status_code == 200  # again: nothing to do, same answer
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import RevokedToken
        rows = db.session.scalars(select(RevokedToken)).all()
        claims = jwt.decode(first, options={"verify_signature": False})
        assert [(row.jti, row.user_id, int(row.expires_at.timestamp())) for row in rows] == [
            (claims["jti"], 1, claims["exp"])]


def test_revoking_an_api_key_ends_that_key_only(client, auth):
    keys = [client.post("/auth/keys", json={"name": name}, headers=auth).get_json()["key"] for name in ("a", "b")]
    # A hint that does not match (or that we do not know) is ignored: §2.1 says search on.
    assert revoke(client, keys[0], token_type_hint="refresh_token").status_code == 200
    assert refused(client, keys[0])
    assert client.get("/conversations", headers=bearer(keys[1])).status_code == 200
    assert client.get("/conversations", headers=auth).status_code == 200
    assert [key["name"] for key in client.get("/auth/keys", headers=auth).get_json()["keys"]] == ["b"]
    assert revoke(client, keys[1], token_type_hint="something_else").status_code == 200
    assert refused(client, keys[1])


def test_any_token_answers_the_same_200(app, client, user):
    """Revoked, expired, forged, unknown, not a token at all: the same answer as a live one (§2.2)."""
    make_user(app, "bob")
    live, bobs = login_token(client), login_token(client, "bob")
    secret = app.config["SECRET_KEY"]
    now = int(time.time())
    expired = jwt.encode({"sub": "1", "ver": 1, "iat": now - 7200, "exp": now - 3600, "jti": "e" * 32}, secret)
    forged = jwt.encode({"sub": "1", "ver": 1, "iat": now, "exp": now + 3600, "jti": "f" * 32}, "not-our-key" * 4)
    no_user = jwt.encode({"sub": "999", "ver": 1, "iat": now, "exp": now + 3600, "jti": "a" * 32}, secret)
    answers = []
    for token in (live, live, expired, forged, no_user, "llmk_" + "x" * 43, "not a token", "x" * 100_000, bobs):
        response = revoke(client, token)
        answers.append((response.status_code, response.get_data(), response.headers["Content-Type"],
                        response.headers["Cache-Control"]))
    assert len(set(answers)) == 1 and answers[0][0] == 200
    assert refused(client, live) and refused(client, bobs)  # holding bob's token is enough (a public client)
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import RevokedToken
        assert db.session.scalar(select(func.count()).select_from(RevokedToken)) == 2  # nothing for the rest


def test_a_malformed_request_is_invalid_request_and_revokes_nothing(client, token):
    def check(response, words):
        body = response.get_json()
        assert response.status_code == 400 and body["error"] == "invalid_request", body
        assert words in body["error_description"] and body["request_id"], body
        assert response.headers["Cache-Control"] == "no-store"

    # What clients of the old /auth/revoke sent (a bearer header, no body) is told where sign-out went.
    check(client.post("/auth/revoke", headers=bearer(token)), "/auth/logout-all")
    check(client.post("/auth/revoke", data={"token": ""}), "token is required")
    check(client.post("/auth/revoke", data={"token_type_hint": "access_token"}), "token is required")
    check(client.post("/auth/revoke", data={"token": [token, token]}), "parameter repeated: token")
    check(client.post("/auth/revoke", json={"token": token}), "Content-Type: application/x-www-form-urlencoded")
    check(client.post("/auth/revoke", data={"token": token}, content_type="multipart/form-data"),
          "Content-Type: application/x-www-form-urlencoded")
    check(client.post(f"/auth/revoke?token={token}"), "not in the URL")
    check(client.post(f"/auth/revoke?token={token}", data={"token": token}), "not in the URL")
    assert client.get("/conversations", headers=bearer(token)).status_code == 200  # none of them revoked it
    assert client.get("/auth/revoke").status_code == 405


def test_revocations_are_throttled_per_address_whatever_the_token(make_app):
    app = make_app(REVOKE_LIMIT_PER_ADDRESS="3 per minute")
    make_user(app)
    client = app.test_client()
    live = login_token(client)
    assert client.post("/auth/revoke").status_code == 400  # malformed: not counted (a typo, not a guess)
    for token in ("unknown-1", "llmk_unknown", login_token(client)):
        assert revoke(client, token).status_code == 200
    throttled = revoke(client, live)
    body = throttled.get_json()
    assert throttled.status_code == 429 and body["error"] == "too_many_attempts" and body["request_id"]
    assert int(throttled.headers["Retry-After"]) == body["retry_after"] > 0
    assert client.get("/conversations", headers=bearer(live)).status_code == 200  # looked at nothing
    other = client.post("/auth/revoke", data={"token": live}, environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert other.status_code == 200 and refused(client, live)  # another address has its own limit


def test_denylist_rows_go_once_their_token_would_have_expired(app, client, user):
    from webapp.extensions import db
    from webapp.models import RevokedToken, utcnow
    with app.app_context():
        db.session.add(RevokedToken(jti="old", user_id=1, expires_at=utcnow() - timedelta(seconds=1)))
        db.session.add(RevokedToken(jti="young", user_id=1, expires_at=utcnow() + timedelta(minutes=5)))
        db.session.commit()
    assert revoke(client, login_token(client)).status_code == 200
    with app.app_context():
        jtis = set(db.session.scalars(select(RevokedToken.jti)))
    assert "old" not in jtis and "young" in jtis and len(jtis) == 2


def test_checking_a_token_is_one_query(app, client, user):
    """The denylist rides on the user lookup: a revoked jti costs no extra round trip."""
    from webapp.auth import tokens
    from webapp.extensions import db
    token = login_token(client)
    with app.app_context():
        statements = []
        listen = (db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        event.listen(*listen)
        try:
            assert tokens.verify(token).username == "alice"
        finally:
            event.remove(*listen)
    assert len(statements) == 1 and "revoked_tokens" in statements[0]


# ---- live, under gunicorn --------------------------------------------------------------------------

def test_authlib_revokes_a_token_it_fetched(servers, app):
    make_user(app)
    server = servers()
    token_url, revoke_url = server.url + "/auth/login", server.url + "/auth/revoke"
    with AuthlibSession() as session:  # a public client: no client id or secret
        token = session.fetch_token(token_url, username="alice", password=PASSWORD)
        assert session.get(server.url + "/conversations", timeout=10).status_code == 200
        other = login(server.url, "alice", PASSWORD)
        response = session.revoke_token(revoke_url, token=token["access_token"], token_type_hint="access_token")
        assert response.status_code == 200 and response.json() == {}
        after = session.get(server.url + "/conversations", timeout=10)
        assert after.status_code == 401 and 'error="invalid_token"' in after.headers["WWW-Authenticate"]
        assert session.revoke_token(revoke_url, token="never-issued").status_code == 200
    assert requests.get(server.url + "/conversations", headers=other, timeout=10).status_code == 200


def test_open_streams_end_with_their_token_or_key_revoked_on_another_server(servers, app, ollama):
    """Streams run on one gunicorn (2 workers); the revocations go through another process. The
    stream of the revoked token ends within 5 s with `signed_out`; the stream of the same person's
    API key goes on until the key is revoked in turn. (The limits are off on the streaming server, so
    the token's row is checked by the statement that starts its turn: service.token_check.)"""
    make_user(app)
    ollama.script(**LONG_ANSWER)
    streaming, other = servers(workers=2, USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0), servers()
    auth = login(streaming.url, "alice", PASSWORD)
    key = requests.post(other.url + "/auth/keys", json={"name": "script"}, headers=auth, timeout=10).json()["key"]
    token = auth["Authorization"].split()[1]
    streams = {name: requests.post(streaming.url + "/chat/", json={"prompt": "talk", "stream": True},
                                   headers=headers, stream=True, timeout=(5, 15))
               for name, headers in (("token", auth), ("key", bearer(key)))}
    assert all(response.status_code == 200 for response in streams.values())
    seen = {name: [] for name in streams}

    def read(name):
        try:
            for item in sse_events(streams[name]):
                seen[name].append((time.monotonic(), item))
        except (requests.RequestException, AttributeError):  # closed by the test at its end
            pass

    readers = [threading.Thread(target=read, args=(name,), daemon=True) for name in streams]
    for reader in readers:
        reader.start()

    def first_token(name, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not any(item[0] == "token" for _, item in seen[name]):
            assert time.monotonic() < deadline, seen[name]
            time.sleep(0.05)

    def ended_within(name, since):
        readers[list(streams).index(name)].join(ENDS_WITHIN + 2)
        at, last = seen[name][-1]
        assert last[0] == "signed_out" and last[1]["code"] == "signed_out", seen[name][-3:]
        assert at - since < ENDS_WITHIN, at - since
        assert not any(item[0] == "done" for _, item in seen[name])

    first_token("token"), first_token("key")
    revoked_at = time.monotonic()
    assert requests.post(other.url + "/auth/revoke", data={"token": token}, timeout=10).status_code == 200
    ended_within("token", revoked_at)
    time.sleep(max(0.0, revoked_at + ENDS_WITHIN + 1 - time.monotonic()))
    assert any(at > revoked_at + ENDS_WITHIN and item[0] == "token" for at, item in seen["key"])  # goes on
    revoked_at = time.monotonic()
    assert requests.post(other.url + "/auth/revoke", data={"token": key}, timeout=10).status_code == 200
    ended_within("key", revoked_at)
    # End the server-owned answers so the next test starts from quiet tables.
    again = login(other.url, "alice", PASSWORD)
    for conversation in requests.get(other.url + "/conversations", headers=again, timeout=10).json()["conversations"]:
        requests.post(f"{other.url}/conversations/{conversation['id']}/stop", headers=again, timeout=10)
    for response in streams.values():
        response.close()


@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "with-idempotency-key"])
def test_an_open_v1_stream_ends_when_its_key_is_revoked(servers, app, ollama, idempotent):
    """/v1 streams are watched too: the openai SDK's stream raises the error frame within 5 s of the
    key being revoked on another server, and the call is saved as cancelled, as when its client goes
    (with an Idempotency-Key too, though a keyed call outlives its client: no retry may follow)."""
    make_user(app)
    ollama.script(**LONG_ANSWER)
    streaming, other = servers(workers=2), servers()
    auth = login(other.url, "alice", PASSWORD)
    key = requests.post(other.url + "/auth/keys", json={"name": "sdk"}, headers=auth, timeout=10).json()["key"]
    client = openai.OpenAI(base_url=streaming.url + "/v1", api_key=key, max_retries=0, timeout=20)
    headers = {"Idempotency-Key": "revoked-call-1"} if idempotent else None
    stream = client.chat.completions.create(model="tinyllama", stream=True, extra_headers=headers,
                                            messages=[{"role": "user", "content": "talk"}])
    texts, revoked_at = [], None
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "")
            if revoked_at is None and "".join(texts):
                revoked_at = time.monotonic()
                assert requests.post(other.url + "/auth/revoke", data={"token": key}, timeout=10).status_code == 200
    assert revoked_at is not None and time.monotonic() - revoked_at < ENDS_WITHIN
    assert "no longer valid" in str(caught.value)
    conversation = requests.get(other.url + "/conversations", headers=auth, timeout=10).json()["conversations"][0]
    deadline = time.monotonic() + 10
    while True:
        messages = requests.get(f"{other.url}/conversations/{conversation['id']}", headers=auth,
                                timeout=10).json()["messages"]
        if messages[-1]["status"] != "streaming" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert messages[-1]["status"] == "cancelled", messages[-1]


@pytest.fixture(autouse=True)
def _insecure_transport_for_authlib(monkeypatch):
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain HTTP on loopback, for the test only
