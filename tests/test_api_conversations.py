"""The conversation endpoints, ownership on every id, the context window and regenerate."""
import pytest

from helpers import both_databases, login_token, make_user

pytestmark = both_databases


def chat(client, auth, prompt, **extra):
    response = client.post("/chat/", json={"prompt": prompt, **extra}, headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_title_comes_from_first_prompt(client, auth):
    body = chat(client, auth, "How do   I bake\nsourdough bread at home with a very old starter from my grandmother?")
    conversation = client.get(f"/conversations/{body['conversation_id']}", headers=auth).get_json()
    assert conversation["title"] == "How do I bake sourdough bread at home with a very old…"
    assert conversation["message_count"] == 2


def test_list_is_newest_first_and_paginated(client, auth):
    ids = [chat(client, auth, f"chat number {n}")["conversation_id"] for n in range(5)]
    chat(client, auth, "bump", conversation_id=ids[1])  # touching a chat moves it to the top
    first = client.get("/conversations?limit=2", headers=auth).get_json()
    assert [c["id"] for c in first["conversations"]] == [ids[1], ids[4]]
    assert first["conversations"][0]["message_count"] == 4
    second = client.get(f"/conversations?limit=2&cursor={first['next_cursor']}", headers=auth).get_json()
    third = client.get(f"/conversations?limit=2&cursor={second['next_cursor']}", headers=auth).get_json()
    assert [c["id"] for c in second["conversations"] + third["conversations"]] == [ids[3], ids[2], ids[0]]
    assert third["next_cursor"] is None
    assert client.get("/conversations?cursor=@@@", headers=auth).status_code == 400
    assert client.get("/conversations?limit=0", headers=auth).status_code == 400


def test_search_over_titles_and_text(client, auth, ollama):
    ollama.script(reply="Paris is the capital.")
    paris = chat(client, auth, "capital of France?")["conversation_id"]
    ollama.script(reply="Use a 100% hydration dough.")
    chat(client, auth, "bread tips")
    found = client.get("/conversations?q=PARIS", headers=auth).get_json()["conversations"]
    assert [c["id"] for c in found] == [paris]
    assert client.get("/conversations?q=100%", headers=auth).get_json()["conversations"][0]["title"] == "bread tips"
    assert client.get("/conversations?q=_", headers=auth).get_json()["conversations"] == []


def test_create_patch_delete(app, client, auth):
    created = client.post("/conversations", json={"title": "Work", "model": "llama3.2",
                                                  "system_prompt": "Answer in French."}, headers=auth)
    assert created.status_code == 201
    conversation = created.get_json()
    assert (conversation["title"], conversation["model"]) == ("Work", "llama3.2")
    patched = client.patch(f"/conversations/{conversation['id']}", json={"title": "Renamed"}, headers=auth)
    assert patched.get_json()["title"] == "Renamed"
    assert patched.get_json()["system_prompt"] == "Answer in French."
    bad = client.patch(f"/conversations/{conversation['id']}", json={"title": ""}, headers=auth)
    assert bad.status_code == 422 and bad.get_json()["error"]["field"] == "title"
    chat(client, auth, "hello", conversation_id=conversation["id"])
    assert client.delete(f"/conversations/{conversation['id']}", headers=auth).status_code == 204
    assert client.get(f"/conversations/{conversation['id']}", headers=auth).status_code == 404
    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        assert db.session.query(Message).count() == 0  # messages went with it


def test_messages_are_paginated_newest_page_first(client, auth):
    conversation_id = chat(client, auth, "m0")["conversation_id"]
    for n in range(1, 4):
        chat(client, auth, f"m{n}", conversation_id=conversation_id)
    page = client.get(f"/conversations/{conversation_id}?limit=3", headers=auth).get_json()
    assert [m["role"] for m in page["messages"]] == ["assistant", "user", "assistant"]
    assert page["messages"][1]["content"] == "m3"
    older = client.get(f"/conversations/{conversation_id}?limit=3&before={page['older_cursor']}",
                       headers=auth).get_json()
    assert [m["content"] for m in older["messages"] if m["role"] == "user"] == ["m1", "m2"]


def test_every_endpoint_hides_other_users_ids(app, client, auth):
    mine = chat(client, auth, "private")
    cid, mid = mine["conversation_id"], mine["message_id"]
    make_user(app, "mallory")
    other = {"Authorization": f"Bearer {login_token(client, 'mallory')}"}
    calls = [
        ("get", f"/conversations/{cid}", None), ("patch", f"/conversations/{cid}", {"title": "mine now"}),
        ("delete", f"/conversations/{cid}", None), ("post", f"/conversations/{cid}/stop", None),
        ("post", f"/conversations/{cid}/regenerate", None), ("get", f"/conversations/{cid}/messages/{mid}", None),
        ("get", f"/conversations/{cid}/messages/{mid}/stream", None), ("get", f"/conversations/{cid}/export", None),
        ("post", "/chat/", {"prompt": "x", "conversation_id": cid}),
    ]
    for method, url, body in calls:
        response = getattr(client, method)(url, json=body, headers=other)
        assert response.status_code == 404, (method, url, response.status_code)
        assert "private" not in response.get_data(as_text=True)
    assert client.get("/conversations", headers=other).get_json()["conversations"] == []
    assert client.get(f"/conversations/{cid}", headers=auth).status_code == 200  # still there, untouched


def test_context_budget_keeps_newest_and_skips_failed_answers(make_app, ollama):
    app = make_app(CONTEXT_MAX_MESSAGES=4, CONTEXT_MAX_CHARS=60)
    client = app.test_client()
    make_user(app)
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    ollama.script(reply="ok")
    cid = chat(client, auth, "first message")["conversation_id"]
    client.patch(f"/conversations/{cid}", json={"system_prompt": "Be terse."}, headers=auth)
    for n in range(3):
        chat(client, auth, f"message {n}", conversation_id=cid)
    ollama.script(fail="status", status=500)
    client.post("/chat/", json={"prompt": "this one fails", "conversation_id": cid}, headers=auth)
    ollama.script(reply="ok")
    chat(client, auth, "latest", conversation_id=cid)
    sent = ollama.chat_requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be terse."}
    assert sent[-1] == {"role": "user", "content": "latest"}
    assert len(sent) == 5  # system + the 4 newest usable messages
    assert all(m["content"] != "" for m in sent)  # the failed (empty) answer was not fed back
    assert {"role": "user", "content": "first message"} not in sent
    ollama.script(reply="ok")
    chat(client, auth, "x" * 200, conversation_id=cid)
    assert ollama.chat_requests[-1]["messages"] == [{"role": "system", "content": "Be terse."},
                                                    {"role": "user", "content": "x" * 200}]


def test_regenerate_replaces_the_last_answer(client, auth, ollama):
    ollama.script(fail="status", status=500)
    failed = client.post("/chat/", json={"prompt": "tell me a joke"}, headers=auth)
    cid = failed.get_json()["error"]["conversation_id"]
    ollama.script(reply="Why did the chicken…")
    again = client.post(f"/conversations/{cid}/regenerate", headers=auth)
    assert again.status_code == 200 and again.get_json()["response"] == "Why did the chicken…"
    assert ollama.chat_requests[-1]["messages"] == [{"role": "user", "content": "tell me a joke"}]
    messages = client.get(f"/conversations/{cid}", headers=auth).get_json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert client.get(f"/conversations/{cid}", headers=auth).get_json()["message_count"] == 2


def test_stop_when_idle_is_409(client, auth):
    cid = chat(client, auth, "hi")["conversation_id"]
    response = client.post(f"/conversations/{cid}/stop", headers=auth)
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "not_generating"


def test_models_listing_and_ollama_down(make_app, ollama):
    app = make_app()
    client = app.test_client()
    make_user(app)
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    body = client.get("/models", headers=auth).get_json()
    assert [m["name"] for m in body["models"]] == ["tinyllama:latest", "llama3.2:latest"]
    down = make_app(OLLAMA_URL="http://127.0.0.1:9").test_client()
    response = down.get("/models", headers=auth)
    assert response.status_code == 503
    assert "cannot reach the model server" in response.get_json()["error"]["message"]


def test_health_is_liveness_and_never_calls_the_llm(make_app, ollama):
    down = make_app(OLLAMA_URL="http://127.0.0.1:9").test_client().get("/health")
    assert down.status_code == 200 and down.get_json() == {"status": "ok"}
    before = len(ollama.requests)
    assert make_app().test_client().get("/health").status_code == 200
    assert len(ollama.requests) == before


def test_ready_is_the_database_at_head_and_reports_the_llm(make_app):
    response = make_app().test_client().get("/ready")
    assert response.status_code == 200 and response.get_json()["llm"]["reachable"] is True
    down = make_app(OLLAMA_URL="http://127.0.0.1:9").test_client().get("/ready")
    assert down.status_code == 200  # the model server being down never makes the app unready
    assert down.get_json()["status"] == "ready" and down.get_json()["llm"]["reachable"] is False


def test_ready_is_503_when_migrations_are_behind(make_app):
    from sqlalchemy import text

    from webapp.extensions import db
    app = make_app()
    with app.app_context():
        db.session.execute(text("UPDATE alembic_version SET version_num = '0001'"))
        db.session.commit()
    try:
        response = app.test_client().get("/ready")
        assert response.status_code == 503 and "migrations" in response.get_json()["database"]
    finally:
        with app.app_context():
            from webapp.readiness import head_revision
            db.session.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head_revision()})
            db.session.commit()


@pytest.mark.parametrize("path", ["/nope", "/conversations/abc"])
def test_unknown_api_paths_answer_json(client, auth, path):
    response = client.get(path, headers=auth)
    assert response.status_code == 404
    if path.startswith("/conversations"):
        assert response.get_json()["error"]["code"] == "not_found"


def test_huge_ids_are_404_not_500(client, auth):
    for path in ("/conversations/99999999999", "/conversations/1/messages/99999999999"):
        assert client.get(path, headers=auth).status_code == 404
    assert client.post("/chat/", json={"prompt": "x", "conversation_id": 2**40}, headers=auth).status_code == 404
    assert client.get("/conversations/1?before=99999999999", headers=auth).status_code in (400, 404)


def test_deleting_a_conversation_mid_answer_answers_404_not_500(app, client, auth, ollama):
    import threading
    ollama.script(reply="a " * 40, delay=0.05)
    result = {}

    def ask():
        result["response"] = app.test_client().post("/chat/", json={"prompt": "long"}, headers=auth)
    thread = threading.Thread(target=ask)
    thread.start()
    deadline = __import__("time").monotonic() + 5
    listing = []
    while not listing and __import__("time").monotonic() < deadline:
        listing = client.get("/conversations", headers=auth).get_json()["conversations"]
    assert client.delete(f"/conversations/{listing[0]['id']}", headers=auth).status_code == 204
    thread.join(10)
    assert result["response"].status_code == 404


def test_model_list_is_cached_briefly(make_app, ollama):
    app = make_app(MODELS_CACHE_SECONDS=60.0)
    client = app.test_client()
    make_user(app)
    auth = {"Authorization": f"Bearer {login_token(client)}"}
    for _ in range(3):
        assert client.get("/models", headers=auth).status_code == 200
    assert sum(1 for r in ollama.requests if r["path"] == "/api/tags") == 1


def test_readiness_does_not_reveal_the_llm_address(make_app):
    body = make_app(OLLAMA_URL="http://127.0.0.1:9").test_client().get("/ready").get_data(as_text=True)
    assert "127.0.0.1:9" not in body
    body = make_app().test_client().get("/ready").get_data(as_text=True)
    assert "127.0.0.1" not in body


def test_export_is_the_whole_conversation_as_markdown(client, auth, ollama):
    ollama.script(reply="Bonjour, **Ada**.")
    cid = chat(client, auth, "Say hello to Ada in French")["conversation_id"]
    client.patch(f"/conversations/{cid}", json={"system_prompt": "Answer in French."}, headers=auth)
    ollama.script(fail="status", status=500)
    client.post("/chat/", json={"prompt": "and again?", "conversation_id": cid}, headers=auth)
    response = client.get(f"/conversations/{cid}/export", headers=auth)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/markdown; charset=utf-8"
    assert response.headers["Content-Disposition"] == f'attachment; filename="conversation-{cid}.md"'
    text = response.get_data(as_text=True)
    assert text.startswith("# Say hello to Ada in French\n")
    order = [text.index(part) for part in ("## System prompt\n\nAnswer in French.", "## You\n\nSay hello",
                                           "## Assistant (tinyllama)\n\nBonjour, **Ada**.", "## You\n\nand again?",
                                           "*[error: ")]
    assert order == sorted(order)  # oldest first, the failed answer says so
