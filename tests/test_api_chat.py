"""POST /chat/ against the Ollama-protocol test server, on PostgreSQL and SQLite."""
import logging

from sqlalchemy import select

from helpers import both_databases, login_token, make_user

pytestmark = both_databases


def messages_of(app, conversation_id):
    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        return [(m.role, m.status, m.content, m.error_code) for m in db.session.scalars(
            select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))]


def test_chat_answers_and_saves_both_messages(app, client, auth, ollama):
    ollama.script(reply="The sky is blue because of Rayleigh scattering.")
    response = client.post("/chat/", json={"prompt": "Why is the sky blue?"}, headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["response"] == "The sky is blue because of Rayleigh scattering."
    assert body["prompt"] == "Why is the sky blue?"
    assert body["model"] == "tinyllama"
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    assert body["done_reason"] == "stop"
    assert messages_of(app, body["conversation_id"]) == [
        ("user", "complete", "Why is the sky blue?", None),
        ("assistant", "complete", "The sky is blue because of Rayleigh scattering.", None)]
    sent = ollama.chat_requests[-1]
    assert sent["model"] == "tinyllama"
    assert sent["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]


def test_conversation_id_continues_with_history(client, auth, ollama):
    first = client.post("/chat/", json={"prompt": "My name is Ada."}, headers=auth).get_json()
    client.patch(f"/conversations/{first['conversation_id']}", json={"system_prompt": "Be brief."},
                 headers=auth)
    ollama.script(reply="Your name is Ada.")
    second = client.post("/chat/", json={"prompt": "What is my name?",
                                         "conversation_id": first["conversation_id"]}, headers=auth)
    assert second.status_code == 200
    assert second.get_json()["conversation_id"] == first["conversation_id"]
    sent = ollama.chat_requests[-1]["messages"]
    assert sent == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "My name is Ada."},
                    {"role": "assistant", "content": first["response"]},
                    {"role": "user", "content": "What is my name?"}]


def test_model_can_be_picked(client, auth, ollama):
    body = client.post("/chat/", json={"prompt": "hi", "model": "llama3.2"}, headers=auth).get_json()
    assert body["model"] == "llama3.2"
    assert ollama.chat_requests[-1]["model"] == "llama3.2"


def test_bad_input_names_the_field(client, auth):
    cases = [
        (dict(data="{not json", content_type="application/json"), 400, None),
        (dict(json=["a list"]), 422, None),
        (dict(json={}), 422, "prompt"),
        (dict(json={"prompt": "   "}), 422, "prompt"),
        (dict(json={"prompt": 42}), 422, "prompt"),
        (dict(json={"prompt": "x" * 40_000}), 422, "prompt"),
        (dict(json={"prompt": "hi", "conversation_id": "seven"}), 422, "conversation_id"),
        (dict(json={"prompt": "hi", "stream": "yes"}), 422, "stream"),
        (dict(json={"prompt": "hi", "options": {"num_predict": -5}}), 422, "options.num_predict"),
        (dict(data="prompt=hi", content_type="application/x-www-form-urlencoded"), 415, None),
    ]
    for kwargs, status, field in cases:
        response = client.post("/chat/", headers=auth, **kwargs)
        assert response.status_code == status, (kwargs, response.get_data(as_text=True))
        error = response.get_json()["error"]
        assert error["request_id"] == response.headers["X-Request-ID"]
        assert error.get("field") == field, kwargs


def test_someone_elses_conversation_is_404(app, client, auth):
    mine = client.post("/chat/", json={"prompt": "secret plans"}, headers=auth).get_json()
    make_user(app, "mallory")
    other = {"Authorization": f"Bearer {login_token(client, 'mallory')}"}
    response = client.post("/chat/", json={"prompt": "leak?", "conversation_id": mine["conversation_id"]},
                           headers=other)
    assert response.status_code == 404
    assert client.post("/chat/", json={"prompt": "x", "conversation_id": 999999}, headers=auth).status_code == 404


def test_ollama_unreachable_is_503_and_prompt_is_kept(make_app, ollama):
    app = make_app(OLLAMA_URL="http://127.0.0.1:9")  # nothing listens on the discard port
    client = app.test_client()
    make_user(app)
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    response = client.post("/chat/", json={"prompt": "hello?"}, headers=auth)
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "llm_unreachable"
    assert messages_of(app, error["conversation_id"]) == [
        ("user", "complete", "hello?", None), ("assistant", "error", "", "llm_unreachable")]


def test_ollama_too_slow_is_504(app, client, auth, ollama):
    ollama.script(reply="slow answer here", fail="stall", fail_after=1, stall=5.0)
    response = client.post("/chat/", json={"prompt": "take your time"}, headers=auth)
    assert response.status_code == 504
    error = response.get_json()["error"]
    assert error["code"] == "llm_timeout"
    assert error["partial_response"] == "slow "
    assert messages_of(app, error["conversation_id"])[1] == ("assistant", "error", "slow ", "llm_timeout")


def test_a_model_the_server_does_not_offer_is_refused_before_anything_is_saved(app, client, auth, ollama):
    response = client.post("/chat/", json={"prompt": "hi", "model": "no-such-model"}, headers=auth)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == ("unknown_model", "model")
    assert "no-such-model" in error["message"]
    with app.app_context():
        from webapp.models import Message
        assert Message.query.count() == 0


def test_an_allowed_model_the_server_lacks_is_404_naming_it(make_app, ollama):
    """The operator's allow-list lets a name through; the model server's own refusal is saved."""
    app = make_app(ALLOWED_MODELS=["no-such-model"])
    client = app.test_client()
    make_user(app)
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    response = client.post("/chat/", json={"prompt": "hi", "model": "no-such-model"}, headers=auth)
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["code"] == "model_not_found"
    assert "no-such-model" in error["message"]
    assert messages_of(app, error["conversation_id"])[0] == ("user", "complete", "hi", None)


def test_upstream_error_before_and_during_stream(app, client, auth, ollama):
    ollama.script(fail="status", status=500)
    response = client.post("/chat/", json={"prompt": "one"}, headers=auth)
    assert response.status_code == 502
    assert "an error was encountered" in response.get_json()["error"]["message"]
    ollama.script(reply="alpha beta gamma delta", fail="midstream", fail_after=2, error="runner crashed")
    response = client.post("/chat/", json={"prompt": "two"}, headers=auth)
    assert response.status_code == 502
    error = response.get_json()["error"]
    assert "runner crashed" in error["message"]
    assert messages_of(app, error["conversation_id"])[1] == ("assistant", "error", "alpha beta ", "upstream_error")


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_log_lines_carry_the_request_id(client, auth, ollama):
    from webapp.logs import RequestIdFilter
    handler = ListHandler()
    handler.addFilter(RequestIdFilter())
    logging.getLogger("webapp").addHandler(handler)
    try:
        response = client.post("/chat/", json={"prompt": "log me"}, headers={**auth, "X-Request-ID": "req-42"})
        response.close()
    finally:
        logging.getLogger("webapp").removeHandler(handler)
    lines = [(r.name, r.request_id, r.getMessage()) for r in handler.records]
    access = [line for line in lines if line[0] == "webapp.access" and "/chat/" in line[2]]
    assert access, lines
    assert access[0][1] == "req-42" and " 200 " in access[0][2] and "user=alice" in access[0][2]
    llm_lines = [line for line in lines if line[2].startswith("llm call")]
    assert llm_lines and llm_lines[0][1] == "req-42"
    assert "model=tinyllama outcome=complete" in llm_lines[0][2] and "completion_tokens=" in llm_lines[0][2]


def test_nul_characters_never_lose_a_prompt_or_an_answer(app, client, auth, ollama):
    """PostgreSQL refuses U+0000 in text; the prompt, the title and the model's answer are kept with
    U+FFFD in its place (the same on SQLite), instead of a 500 and a lost turn."""
    ollama.script(chunks=["half\x00", "way"])
    response = client.post("/chat/", json={"prompt": "nul\x00here"}, headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "complete" and body["response"] == "half\ufffdway"  # what was saved
    assert messages_of(app, body["conversation_id"]) == [
        ("user", "complete", "nul\ufffdhere", None), ("assistant", "complete", "half\ufffdway", None)]
    listed = client.get("/conversations", headers=auth).get_json()["conversations"]
    assert listed[0]["title"] == "nul\ufffdhere"
    renamed = client.patch(f"/conversations/{body['conversation_id']}", json={"title": "a\x00b"}, headers=auth)
    assert renamed.status_code == 200 and renamed.get_json()["title"] == "a\ufffdb"
    assert client.get("/conversations?q=a%00b", headers=auth).status_code == 200
    login = client.post("/auth/login", data={"username": "ali\x00ce", "password": "whatever-it-is"})
    assert login.status_code == 400 and login.get_json()["error"] == "invalid_grant"
