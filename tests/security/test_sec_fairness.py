"""Issue 9, item 6: one person cannot drive the model as hard as they like. Against gunicorn with two
workers: the per-person limits hold under parallel bursts (counted in the database, so both workers
agree), the operator's ceilings on options are refused on every door, and so are model names the
server does not offer."""
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from helpers import PASSWORD, csrf, make_user, page_sign_in
from live import ROOT, LiveServer, login

MAX_RUNNING, PER_MINUTE = 2, 5


@pytest.fixture(scope="module")
def limited(pg_url, fake_ollama):
    server = LiveServer(pg_url, fake_ollama.url, workers=2, USER_MAX_RUNNING=MAX_RUNNING,
                        USER_MAX_PER_MINUTE=PER_MINUTE, LLM_MAX_PARALLEL=0, LLM_READ_TIMEOUT=10).start()
    yield server
    server.stop()


def assistant_rows(app):
    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Message).where(Message.role == "assistant"))


def override(app, username, **limits):
    from webapp.auth.accounts import find_user
    from webapp.extensions import db
    with app.app_context():
        user = find_user(username)
        for name, value in limits.items():
            setattr(user, name, value)
        db.session.commit()


def burst(server, auth, count, stream=True):
    def one(n):
        return requests.post(server.url + "/chat/", json={"prompt": f"burst {n}", "stream": stream},
                             headers=auth, timeout=30, stream=stream)
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_at_most_max_running_answers_per_person_under_a_parallel_burst(app, fresh_db, ollama, limited):
    make_user(app)
    make_user(app, "bob")
    alice = login(limited.url, "alice", PASSWORD)
    ollama.script(reply=" ".join(f"w{i}" for i in range(30)), delay=0.1)  # 3 s: they stay running
    responses = burst(limited, alice, 10)
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * MAX_RUNNING + [429] * (10 - MAX_RUNNING)
    refused = [response for response in responses if response.status_code == 429]
    for response in refused:
        error = response.json()["error"]
        assert error["code"] == "too_many_answers" and int(response.headers["Retry-After"]) >= 1
        assert error["retry_after"] == int(response.headers["Retry-After"])
    assert assistant_rows(app) == MAX_RUNNING  # counted in the database: both workers agreed
    # Someone else is not held back by alice's answers.
    bob = login(limited.url, "bob", PASSWORD)
    assert requests.post(limited.url + "/chat/", json={"prompt": "mine", "stream": True}, headers=bob,
                         timeout=30, stream=True).status_code == 200
    for response in responses:
        response.close()


def test_at_most_per_minute_answers_per_person_under_a_parallel_burst(app, fresh_db, ollama, limited):
    make_user(app)
    override(app, "alice", max_running=0)  # an admin's override: no limit on answers at once for alice
    alice = login(limited.url, "alice", PASSWORD)
    responses = burst(limited, alice, 12, stream=False)
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * PER_MINUTE + [429] * (12 - PER_MINUTE)
    retry = [int(r.headers["Retry-After"]) for r in responses if r.status_code == 429]
    assert all(1 <= seconds <= 60 for seconds in retry)
    assert all("a minute" in r.json()["error"]["message"] for r in responses if r.status_code == 429)
    assert assistant_rows(app) == PER_MINUTE
    # Pages: the same limit, in words above the composer.
    browser, _ = page_sign_in(limited.url, "alice", PASSWORD)
    token = csrf(browser, limited.url + "/?new=1")
    page = browser.post(limited.url + "/c/new", data={"prompt": "one more", "csrf_token": token})
    assert page.status_code == 429 and "answers a minute" in page.text and 'id="composer-error"' in page.text


def test_ceilings_on_options_are_refused_on_every_door(app, fresh_db, ollama, limited):
    make_user(app)
    auth = login(limited.url, "alice", PASSWORD)
    for name, value in (("num_ctx", 8193), ("num_predict", 2049), ("num_ctx", 262144)):
        response = requests.post(limited.url + "/chat/", json={"prompt": "big", "options": {name: value}},
                                 headers=auth, timeout=10)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == f"options.{name}"
    ok = requests.post(limited.url + "/chat/", json={"prompt": "fits", "options": {"num_ctx": 8192,
                                                                                  "num_predict": 2048}},
                       headers=auth, timeout=10)
    assert ok.status_code == 200
    assert ollama.chat_requests[-1]["options"]["num_ctx"] == 8192
    conversation_id = ok.json()["conversation_id"]
    again = requests.post(limited.url + f"/conversations/{conversation_id}/regenerate",
                          json={"options": {"num_predict": 4096}}, headers=auth, timeout=10)
    assert again.status_code == 422 and again.json()["error"]["field"] == "options.num_predict"
    assert len(ollama.chat_requests) == 1  # nothing over the ceilings reached the model
    options = requests.get(limited.url + "/openapi.json", timeout=10).json()["components"]["schemas"]["Options"]
    assert options["properties"]["num_ctx"]["maximum"] == 8192
    assert options["properties"]["num_predict"]["maximum"] == 2048


def test_the_openapi_maxima_come_from_the_running_configuration(make_app):
    app = make_app(LLM_MAX_NUM_CTX=4096, LLM_MAX_NUM_PREDICT=512)
    options = app.test_client().get("/openapi.json").get_json()["components"]["schemas"]["Options"]["properties"]
    assert (options["num_ctx"]["maximum"], options["num_predict"]["maximum"]) == (4096, 512)
    from webapp.api.openapi import SPEC  # the module's own copy is untouched
    assert SPEC["components"]["schemas"]["Options"]["properties"]["num_ctx"]["maximum"] == 262144


def test_unknown_models_are_refused_on_every_door(app, fresh_db, ollama, limited):
    make_user(app)
    base, auth = limited.url, login(limited.url, "alice", PASSWORD)
    name = "evil\nmodel" + "x" * 100

    def refused(response, field="model"):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        return error["code"] == "unknown_model" and error["field"] == field

    assert refused(requests.post(base + "/chat/", json={"prompt": "hi", "model": name}, headers=auth))
    assert refused(requests.post(base + "/chat/", json={"prompt": "hi", "model": "llama3"}, headers=auth))
    assert refused(requests.post(base + "/conversations", json={"model": name}, headers=auth))
    created = requests.post(base + "/conversations", json={"model": "llama3.2"}, headers=auth)  # :latest
    assert created.status_code == 201
    conversation_id = created.json()["id"]
    assert refused(requests.patch(base + f"/conversations/{conversation_id}", json={"model": name}, headers=auth))
    turn = requests.post(base + "/chat/", json={"prompt": "hi", "conversation_id": conversation_id}, headers=auth)
    assert turn.status_code == 200
    assert refused(requests.post(base + f"/conversations/{conversation_id}/regenerate", json={"model": name},
                                 headers=auth))
    # Pages: the picker's value, on a new chat and in a conversation.
    browser, _ = page_sign_in(base, "alice", PASSWORD)
    token = csrf(browser, base + "/?new=1")
    for url in ("/c/new", f"/c/{conversation_id}/messages"):
        page = browser.post(base + url, data={"prompt": "hi", "model": name, "csrf_token": token})
        assert page.status_code == 422 and "not a model this server offers" in page.text
    assert len(ollama.chat_requests) == 1 and ollama.chat_requests[0]["model"] == "llama3.2"
    assert "evil\nmodel" not in limited.log_text()


def test_unreachable_model_server_accepts_the_allow_list_and_the_default_only(make_app, ollama):
    from helpers import login_token
    app = make_app(OLLAMA_URL="http://127.0.0.1:9", ALLOWED_MODELS=["big:70b"], DEFAULT_MODEL="tinyllama")
    make_user(app)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    for model, status in (("big:70b", 201), ("tinyllama", 201), ("tinyllama:latest", 201), ("llama3.2", 422)):
        assert client.post("/conversations", json={"model": model}, headers=auth).status_code == status, model


def test_zero_turns_the_limits_and_the_queue_off(app, fresh_db, ollama):
    """The bench's many-stream runs set all three to 0: no lock, no count, no queue."""
    server = LiveServer(fresh_db, ollama.url, workers=2, USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0,
                        LLM_MAX_PARALLEL=0, LLM_READ_TIMEOUT=10, DB_POOL_TIMEOUT=10).start()
    try:
        make_user(app)
        auth = login(server.url, "alice", PASSWORD)
        ollama.script(reply=" ".join(f"w{i}" for i in range(20)), delay=0.1)  # 2 s each: all open together
        # (DB_POOL_TIMEOUT: so many turns *starting* at one instant may otherwise meet a 503 by design)
        responses = burst(server, auth, 24)
        assert [response.status_code for response in responses] == [200] * 24
        assert ollama.wait_for_event("chat_start", timeout=10)
        from webapp.extensions import db
        from webapp.models import Message, RateLimitHit
        with app.app_context():
            assert db.session.scalar(select(func.count()).select_from(RateLimitHit)) == 0
            statuses = set(db.session.scalars(select(Message.status).where(Message.role == "assistant")))
        assert "queued" not in statuses
        for response in responses:
            response.close()
        assert ollama.peak_streams >= 10  # together at the model: no queue of 4, no limit of 2 (busy box: not all 24)
    finally:
        server.stop()


def test_set_limits_command(app, fresh_db):
    make_user(app)

    def flask(*args):
        env = {"FLASK_APP": "webapp", "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"]}
        import os
        return subprocess.run([sys.executable, "-m", "flask", *args], cwd=ROOT, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=60)
    result = flask("set-limits", "Alice", "--max-running", "5", "--per-minute", "0")
    assert result.returncode == 0, result.stderr
    assert re.search(r"max running 5, per minute 0", result.stdout)
    result = flask("set-limits", "alice", "--max-running", "default")
    assert "max running default (2)" in result.stdout and "per minute 0" in result.stdout
    assert flask("set-limits", "alice", "--per-minute", "-1").returncode != 0
    assert "no user named 'nobody'" in flask("set-limits", "nobody", "--per-minute", "1").stderr


def test_an_api_key_can_be_held_to_limits_of_its_own(app, fresh_db, ollama):
    """`flask set-limits NAME --key PREFIX`: calls made with that key meet the key's limits; the
    person's own sign-in (and their other keys) keep the person's."""
    import os
    make_user(app)
    client = app.test_client()
    token = {"Authorization": "Bearer " + client.post(
        "/auth/login", data={"username": "alice", "password": PASSWORD}).get_json()["access_token"]}
    made = client.post("/auth/keys", json={"name": "ci bot"}, headers=token).get_json()
    bot = {"Authorization": "Bearer " + made["key"]}
    env = {**os.environ, "FLASK_APP": "webapp", "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"]}
    result = subprocess.run([sys.executable, "-m", "flask", "set-limits", "alice", "--key", made["prefix"],
                             "--per-minute", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "per minute 1" in result.stdout
    ollama.script(reply="ok")
    assert client.post("/chat/", json={"prompt": "one"}, headers=bot).status_code == 200
    refused = client.post("/chat/", json={"prompt": "two"}, headers=bot)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "too_many_answers"
    assert client.post("/chat/", json={"prompt": "three"}, headers=token).status_code == 200  # the person's own
    assert "live keys starting" in subprocess.run(
        [sys.executable, "-m", "flask", "set-limits", "alice", "--key", "llmk_nope", "--per-minute", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stderr
