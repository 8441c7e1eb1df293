"""POST /chat/ with a JWT: the token's row (account active, token version, not revoked) is checked by
the statement that starts the turn (the per-person limits off) or by the person's lock before it (on),
service.token_check; nothing is written unless it passed. Every refusal is the 401 it was, nothing is
written, and a person's own limits still hold. On PostgreSQL and SQLite (which checks the row first)."""
import pytest
from sqlalchemy import func, select, update
from test_turn_path import REPLY, statements_of_this_thread

from helpers import both_databases, login_token, make_user

pytestmark = both_databases
LIMITS_OFF = dict(USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0, LLM_MAX_PARALLEL=0)
LIMITS_ON = dict(USER_MAX_RUNNING=5, USER_MAX_PER_MINUTE=30, LLM_MAX_PARALLEL=0)


@pytest.fixture(params=[LIMITS_OFF, LIMITS_ON], ids=["limits-off", "limits-on"])
def api(make_app, ollama, request):
    app = make_app(**request.param)
    user_id = make_user(app)
    client = app.test_client()
    ollama.script(reply=REPLY)
    return app, client, user_id


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def counts(app):
    from webapp.extensions import db
    from webapp.models import Conversation, Message
    with app.app_context():
        return tuple(db.session.scalar(select(func.count()).select_from(model)) for model in (Conversation, Message))


def test_the_token_check_rides_on_the_start(api, database_url):
    app, client, _ = api
    auth = bearer(login_token(client))
    with statements_of_this_thread(app) as statements:
        first = client.post("/chat/", json={"prompt": "hello"}, headers=auth)
        assert first.status_code == 200, first.get_json()
        second = client.post("/chat/", json={"prompt": "again", "conversation_id": first.get_json()["conversation_id"]},
                             headers=auth)
        assert second.status_code == 200, second.get_json()
    if database_url.startswith("postgresql"):
        # [the lock with the token's row,] the start (with the token's row), [the history,] the final save
        lock = ["WITH"] if app.config["USER_MAX_RUNNING"] else []
        assert statements == [*lock, "WITH", "WITH", *lock, "WITH", "SELECT", "WITH"], statements
    assert second.get_json()["response"] == REPLY and counts(app) == (1, 4)


def sign_out_everywhere(app, client, token, user_id):
    assert client.post("/auth/logout-all", headers=bearer(token)).status_code == 204


def revoke(app, client, token, user_id):
    assert client.post("/auth/revoke", data={"token": token}).status_code == 200


def deactivate(app, client, token, user_id):
    from webapp.extensions import db
    from webapp.models import User
    with app.app_context():
        db.session.execute(update(User).where(User.id == user_id).values(is_active=False))
        db.session.commit()


# The ways a token ends, and what the refusal says: both API doors are checked against each.
ENDINGS = pytest.mark.parametrize(("end", "message"), [(revoke, "token was revoked"),
                                                       (sign_out_everywhere, "token is no longer valid"),
                                                       (deactivate, "token is no longer valid")],
                                  ids=["revoked", "signed-out-everywhere", "account-disabled"])


@ENDINGS
def test_a_refused_token_writes_nothing(api, end, message):
    app, client, user_id = api
    token = login_token(client)
    first = client.post("/chat/", json={"prompt": "hello"}, headers=bearer(token))
    conversation_id = first.get_json()["conversation_id"]
    before = counts(app)
    end(app, client, token, user_id)
    for body in ({"prompt": "new"}, {"prompt": "next", "conversation_id": conversation_id},
                 {"prompt": "streamed", "stream": True},
                 {"conversation_id": "not a number"}, {}):  # a bad body too: the token is what is refused
        response = client.post("/chat/", json=body, headers=bearer(token))
        assert response.status_code == 401, (body, response.get_json())
        assert response.get_json()["error"]["message"] == message
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert client.post("/chat/", data="not json", headers=bearer(token)).status_code == 401
    assert counts(app) == before


def test_a_person_with_limits_of_their_own_still_has_them(api, database_url):
    """This person's own limits (`flask set-limits`) win over the configuration's. Limits off by
    configuration: the folded start writes nothing for them, and the turn takes the guarded path with
    the row the statement read. On: their limits are read with the token's row, under their lock."""
    from webapp.extensions import db
    from webapp.models import User
    app, client, user_id = api
    with app.app_context():
        db.session.execute(update(User).where(User.id == user_id).values(max_per_minute=1))
        db.session.commit()
    auth = bearer(login_token(client))
    with statements_of_this_thread(app) as statements:
        assert client.post("/chat/", json={"prompt": "one"}, headers=auth).status_code == 200
    if database_url.startswith("postgresql") and not app.config["USER_MAX_RUNNING"]:
        assert statements == ["WITH", "SELECT", "WITH", "WITH"], statements  # folded (nothing), lock, start, save
    refused = client.post("/chat/", json={"prompt": "two"}, headers=auth)
    assert refused.status_code == 429 and "at most 1 answers a minute" in refused.get_json()["error"]["message"]
    assert counts(app) == (1, 2)


def test_a_person_without_limits_of_their_own_is_not_held(make_app, ollama):
    """Limits on by configuration, both off for this person: the guarded start lets every turn through."""
    from webapp.extensions import db
    from webapp.models import User
    app = make_app(USER_MAX_RUNNING=1, USER_MAX_PER_MINUTE=1, LLM_MAX_PARALLEL=0)
    user_id = make_user(app)
    with app.app_context():
        db.session.execute(update(User).where(User.id == user_id).values(max_running=0, max_per_minute=0))
        db.session.commit()
    client = app.test_client()
    ollama.script(reply=REPLY)
    auth = bearer(login_token(client))
    assert [client.post("/chat/", json={"prompt": f"n{index}"}, headers=auth).status_code
            for index in range(3)] == [200, 200, 200]
    assert counts(app) == (3, 6)


def test_a_bad_body_with_a_good_token_is_the_body_s_error(api):
    app, client, _ = api
    auth = bearer(login_token(client))
    assert client.post("/chat/", json={"prompt": ""}, headers=auth).status_code == 422
    assert client.post("/chat/", json={"prompt": "x", "conversation_id": "7"}, headers=auth).status_code == 422
    missing = client.post("/chat/", json={"prompt": "x", "conversation_id": 999}, headers=auth)
    assert missing.status_code == 404 and counts(app) == (0, 0)


def test_the_check_holds_on_every_turn_not_only_the_first(api):
    """The start's statements are kept compiled and sent by psycopg from their second run on
    (webapp/direct_sql.py): the token's row is read and judged the same on the fifth turn as on
    the first, accepted or refused."""
    app, client, _ = api
    token = login_token(client)
    conversation_id = None
    for n in range(5):
        body = {"prompt": f"turn {n}"} if n % 2 == 0 else {"prompt": f"turn {n}", "conversation_id": conversation_id}
        response = client.post("/chat/", json=body, headers=bearer(token))
        assert response.status_code == 200, (n, response.get_json())
        conversation_id = response.get_json()["conversation_id"]
    before = counts(app)
    revoke(app, client, token, None)
    for n in range(4):
        body = {"prompt": "new"} if n % 2 == 0 else {"prompt": "next", "conversation_id": conversation_id}
        response = client.post("/chat/", json=body, headers=bearer(token))
        assert response.status_code == 401, (n, response.get_json())
        assert response.get_json()["error"]["message"] == "token was revoked"
    assert counts(app) == before


def test_each_start_statement_is_compiled_once(api, monkeypatch):
    """The starts are built once and kept compiled by webapp/direct_sql.py from their second run
    (compiling the guarded start costs several milliseconds): turns after the first few compile
    nothing, with the limits on or off."""
    from webapp import direct_sql
    app, client, _ = api
    compiled = []
    original = direct_sql._Plan.__init__

    def counting(self, statement, dialect):
        compiled.append(statement)
        original(self, statement, dialect)
    monkeypatch.setattr(direct_sql._Plan, "__init__", counting)
    auth = bearer(login_token(client))
    conversation_id = None
    for n in range(8):
        body = {"prompt": f"turn {n}"} if n % 2 == 0 else {"prompt": f"turn {n}", "conversation_id": conversation_id}
        response = client.post("/chat/", json=body, headers=auth)
        assert response.status_code == 200, response.get_json()
        conversation_id = response.get_json()["conversation_id"]
    assert len(compiled) == len({id(statement) for statement in compiled})


# ---- /v1/chat/completions with a JWT: the same fold, OpenAI's 401 ----------------------------------

V1 = "/v1/chat/completions"
HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "again"}]


def v1_body(messages=None, **extra):
    return {"model": "tinyllama", "messages": messages or [{"role": "user", "content": "hello"}], **extra}


def test_v1_s_token_check_rides_on_the_start(api, database_url):
    """A call that starts a conversation (with earlier messages or without) reads the token's row in
    its start, as POST /chat/ does: no statement of its own before it (the answer is generated and
    saved in the background)."""
    app, client, _ = api
    auth = bearer(login_token(client))
    for messages in (None, HISTORY):
        with statements_of_this_thread(app) as statements:
            response = client.post(V1, json=v1_body(messages), headers=auth)
            assert response.status_code == 200, response.get_json()
        if database_url.startswith("postgresql"):
            lock = ["WITH"] if app.config["USER_MAX_RUNNING"] else []  # the person's lock with the token's row
            assert statements == [*lock, "WITH"], statements
        assert response.get_json()["choices"][0]["message"]["content"] == REPLY
    assert counts(app) == (2, 2 + 4)  # the system message is the second conversation's system prompt


@ENDINGS
def test_v1_refuses_the_token_on_every_turn_and_writes_nothing(api, end, message):
    """The fold's refusal is OpenAI's 401 invalid_api_key, on the first turn after the token ended
    and every later one (the start is sent by psycopg from its second run), whatever else the
    request holds: a continuation, a stream, an Idempotency-Key, a bad body."""
    app, client, user_id = api
    token = login_token(client)
    for _ in range(3):  # the starts are kept compiled: the later refusals take that path
        first = client.post(V1, json=v1_body(HISTORY), headers=bearer(token))
        assert first.status_code == 200, first.get_json()
    conversation_id = first.headers["X-Conversation-Id"]
    before = counts(app)
    end(app, client, token, user_id)
    calls = [(v1_body(), {}), (v1_body(HISTORY), {}), (v1_body(HISTORY), {}),
             (v1_body(HISTORY), {"X-Conversation-Id": conversation_id}), (v1_body(stream=True), {}),
             (v1_body(), {"Idempotency-Key": "k1"}), (v1_body(n=2), {}), ({"messages": []}, {})]
    for body, headers in calls:
        response = client.post(V1, json=body, headers={**bearer(token), **headers})
        assert response.status_code == 401, (body, response.get_json())
        error = response.get_json()["error"]
        assert error["code"] == "invalid_api_key" and message in error["message"], error
    assert client.post(V1, data="not json", headers=bearer(token)).status_code == 401
    assert counts(app) == before


def test_v1_keeps_a_person_s_own_limits(api):
    from webapp.extensions import db
    from webapp.models import User
    app, client, user_id = api
    with app.app_context():
        db.session.execute(update(User).where(User.id == user_id).values(max_per_minute=1))
        db.session.commit()
    auth = bearer(login_token(client))
    assert client.post(V1, json=v1_body(), headers=auth).status_code == 200
    refused = client.post(V1, json=v1_body(HISTORY), headers=auth)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert counts(app) == (1, 2)
