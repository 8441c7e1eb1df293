"""The browser pages and htmx fragments, through the Flask test client."""
import json
import re

import pytest

from helpers import PASSWORD, csrf_of, htmx, make_user, read_sse, send, sign_in


def test_pages_redirect_to_sign_in_and_back(client, user):
    response = client.get("/c/5")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")
    token = csrf_of(client)
    back = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token,
                                       "next": "/settings"})
    assert back.headers["Location"] == "/settings"


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example",
                                    "javascript:alert(1)"])
def test_next_only_goes_to_local_paths(client, user, target):
    token = csrf_of(client)
    response = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token,
                                           "next": target})
    assert response.headers["Location"] == "/"


def test_wrong_password_is_a_friendly_page(client, user):
    token = csrf_of(client)
    response = client.post("/login", data={"username": "alice", "password": "nope", "csrf_token": token})
    assert response.status_code == 401
    assert "Incorrect username or password." in response.get_data(as_text=True)


def test_csrf_is_required(client, user):
    response = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 400
    signed_in = sign_in(client)
    assert client.post("/c/new", data={"prompt": "hi"}).status_code == 400
    assert client.post("/c/new", data={"prompt": "hi"}, headers={"X-CSRFToken": "forged"}).status_code == 400
    assert client.post("/c/new", data={"prompt": "hi"}, headers={"HX-Request": "true", "X-CSRFToken": signed_in}
                       ).status_code == 204


def test_sign_out_is_post(browser):
    assert browser.get("/logout").status_code == 405
    response = browser.post("/logout", data={"csrf_token": browser.csrf})
    assert response.status_code == 302
    assert browser.get("/").status_code == 302


def test_register_and_only_the_setup_token_makes_an_admin(make_app):
    """Being first no longer makes an admin (a race anyone wins); the one-time setup token does."""
    from webapp.auth.accounts import find_user
    from webapp.auth.setup import setup_token
    app = make_app()

    def register(username, **extra):
        client = app.test_client()
        page = client.get("/register").get_data(as_text=True)
        token = csrf_of(client, "/register")
        return page, client.post("/register", data={"username": username, "password": "follow the rabbit",
                                                    "confirm": "follow the rabbit", "csrf_token": token, **extra})
    page, response = register("Neo")
    assert 'name="setup_token"' in page and response.status_code == 302
    _, wrong = register("morpheus", setup_token="not-it")
    assert wrong.status_code == 422 and "setup token is not right" in wrong.get_data(as_text=True)
    with app.app_context():
        assert not find_user("neo").is_admin and find_user("morpheus") is None
        secret = setup_token()
    page, response = register("Oracle", setup_token=secret)
    assert 'name="setup_token"' in page and response.status_code == 302
    page, again = register("smith", setup_token=secret)
    assert 'name="setup_token"' not in page  # an admin exists: the form stops asking
    assert again.status_code == 422 and "already been used" in again.get_data(as_text=True)
    with app.app_context():
        assert find_user("oracle").is_admin and find_user("smith") is None
    mismatch = app.test_client()
    token = csrf_of(mismatch, "/register")
    response = mismatch.post("/register", data={"username": "trinity", "password": "aaaaaaaaaa",
                                                "confirm": "bbbbbbbbbb", "csrf_token": token})
    assert response.status_code == 422 and "do not match" in response.get_data(as_text=True)


def test_signup_can_be_switched_off(make_app):
    client = make_app(ALLOW_SIGNUP=False).test_client()
    assert client.get("/register").status_code == 404
    assert "Create one" not in client.get("/login").get_data(as_text=True)


def test_password_change_ends_other_sessions_and_tokens(app, browser):
    other = app.test_client()
    sign_in(other)
    api_token = other.post("/auth/login", data={"username": "alice", "password": PASSWORD}).get_json()["access_token"]
    response = browser.post("/settings", data={"current_password": PASSWORD, "new_password": "a new password!",
                                               "confirm": "a new password!", "csrf_token": browser.csrf})
    assert response.status_code == 200 and "was changed" in response.get_data(as_text=True)
    assert browser.get("/?new=1").status_code == 200  # this browser stays signed in
    assert other.get("/?new=1").status_code == 302     # the other session is over
    assert other.get("/conversations", headers={"Authorization": f"Bearer {api_token}"}).status_code == 401
    wrong = browser.post("/settings", data={"current_password": "nope", "new_password": "x" * 10,
                                            "confirm": "x" * 10, "csrf_token": browser.csrf})
    assert wrong.status_code == 422 and "current password is not right" in wrong.get_data(as_text=True)


def test_chat_page_lists_conversations_and_messages(browser, ollama):
    ollama.script(reply="**Bold** answer")
    response = send(browser, "first question")
    assert response.status_code == 302
    page_url = response.headers["Location"]
    conversation_id = int(page_url.rsplit("/", 1)[1])
    events = read_sse(browser, f"/c/{conversation_id}/m/2/events")
    assert events[-1][0] == "done"
    page = browser.get(page_url).get_data(as_text=True)
    assert "first question" in page
    assert "<strong>Bold</strong> answer" in page
    assert f'id="conv-{conversation_id}"' in page
    assert "tok/s" in page
    assert 'name="model"' in page and "tinyllama:latest" in page


def test_htmx_send_returns_fragment_and_sse_streams(browser, ollama):
    ollama.script(reply="alpha beta gamma delta", delay=0.05)
    response = send(browser, "start")
    conversation_id = int(response.headers["Location"].rsplit("/", 1)[1])
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    fragment = send(browser, "more please", conversation_id, **htmx(browser))
    html = fragment.get_data(as_text=True)
    assert fragment.status_code == 200 and "<html" not in html
    assert "more please" in html
    stream_url = re.search(r'data-stream-url="([^"]+)"', html).group(1)
    events = read_sse(browser, stream_url)
    names = [name for name, _ in events]
    assert names.count("html") >= 2 and names[-1] == "done"
    assert "alpha beta gamma delta" in events[-1][1]
    assert "data-stream-url" not in events[-1][1]  # the final fragment no longer streams


def test_busy_conversation_keeps_the_draft(browser, ollama):
    ollama.script(reply="slow " * 20, delay=0.1)
    response = send(browser, "long one")
    conversation_id = int(response.headers["Location"].rsplit("/", 1)[1])
    again = send(browser, "my precious draft", conversation_id)
    assert again.status_code == 409
    assert "my precious draft" in again.get_data(as_text=True)
    assert "already being generated" in again.get_data(as_text=True)
    fragment = send(browser, "my precious draft", conversation_id, **htmx(browser))
    assert fragment.headers["HX-Retarget"] == "#composer-error"
    browser.post(f"/c/{conversation_id}/stop", data={"csrf_token": browser.csrf})


def test_errors_are_told_in_words_with_retry(browser, ollama):
    ollama.script(fail="status", status=500)
    conversation_id = int(send(browser, "fail please").headers["Location"].rsplit("/", 1)[1])
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "The model server failed while answering." in page
    assert "Retry" in page
    ollama.script(reply="better now")
    response = browser.post(f"/c/{conversation_id}/regenerate", data={"csrf_token": browser.csrf})
    assert response.status_code == 302
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    stream = re.search(r'data-stream-url="([^"]+)"', page)
    if stream:
        read_sse(browser, stream.group(1))
    assert "better now" in browser.get(f"/c/{conversation_id}").get_data(as_text=True)


def test_sidebar_search_and_paging(browser, ollama):
    for n in range(3):
        conversation_id = int(send(browser, f"topic {n} zebra" if n == 1 else f"topic {n}")
                              .headers["Location"].rsplit("/", 1)[1])
        read_sse(browser, f"/c/{conversation_id}/m/{conversation_id * 2}/events")
    found = browser.get("/sidebar?q=zebra", headers=htmx(browser)).get_data(as_text=True)
    assert "topic 1 zebra" in found and "topic 0" not in found
    nothing = browser.get("/sidebar?q=unicorn", headers=htmx(browser)).get_data(as_text=True)
    assert "No chats match" in nothing


def test_rename_and_delete(browser):
    conversation_id = int(send(browser, "name me").headers["Location"].rsplit("/", 1)[1])
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    renamed = browser.post(f"/c/{conversation_id}/rename", data={"title": "Fresh name"}, headers=htmx(browser))
    assert 'id="conv-' in renamed.get_data(as_text=True) and "Fresh name" in renamed.get_data(as_text=True)
    deleted = browser.post(f"/c/{conversation_id}/delete", headers=htmx(browser))
    assert deleted.status_code == 204 and deleted.headers["HX-Redirect"] == "/"
    assert browser.get(f"/c/{conversation_id}").status_code == 404


def test_someone_elses_conversation_is_404_everywhere(app, browser):
    conversation_id = int(send(browser, "mine").headers["Location"].rsplit("/", 1)[1])
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    make_user(app, "mallory")
    other = app.test_client()
    other.csrf = sign_in(other, "mallory")
    headers = htmx(other)
    for method, path in [("get", f"/c/{conversation_id}"), ("get", f"/c/{conversation_id}/older?before=9"),
                         ("get", f"/c/{conversation_id}/m/2/events"), ("post", f"/c/{conversation_id}/messages"),
                         ("post", f"/c/{conversation_id}/stop"), ("post", f"/c/{conversation_id}/regenerate"),
                         ("post", f"/c/{conversation_id}/rename"), ("post", f"/c/{conversation_id}/delete"),
                         ("post", f"/c/{conversation_id}/settings")]:
        response = getattr(other, method)(path, data={"prompt": "x", "title": "x"}, headers=headers)
        assert response.status_code == 404, (method, path, response.status_code)
        assert "mine" not in response.get_data(as_text=True)


def test_security_headers(client):
    response = client.get("/login")
    csp = response.headers["Content-Security-Policy"]
    script_src = re.search(r"script-src ([^;]+)", csp).group(1)
    assert "'unsafe-inline'" not in script_src and "'self'" in script_src
    assert "<script>" not in response.get_data(as_text=True)  # no inline scripts at all
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_session_cookie_flags(client, user):
    token = csrf_of(client)
    response = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_status_indicator(browser, make_app):
    assert "Model server online" in browser.get("/status").get_data(as_text=True)


def test_no_cdn_in_pages(browser):
    html = browser.get("/?new=1").get_data(as_text=True)
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert not url.startswith(("http://", "https://", "//")), url


def test_signed_out_htmx_requests_get_a_full_page_redirect(client, user):
    response = client.get("/sidebar?q=x", headers={"HX-Request": "true"})
    assert response.status_code == 204
    assert response.headers["HX-Redirect"] == "/login?next=/sidebar?q%3Dx"


def test_huge_bodies_are_refused_cleanly(client, auth):
    response = client.post("/chat/", data=b"{" + b" " * (200 * 1024) + b"}", headers=auth,
                           content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"


def test_throttled_tail_shows_while_the_model_pauses(browser, ollama):
    """'two' arrives right after 'one' (inside the render throttle), then the model stalls for a
    second: the snapshot with 'two' must go out during the stall, not wait for the next token."""
    ollama.script(reply="one two three four", delay=0.03, fail="stall", fail_after=2, stall=1.0)
    conversation_id = int(send(browser, "pause please").headers["Location"].rsplit("/", 1)[1])
    snapshots = [json.loads(data)["html"] for name, data in read_sse(browser, f"/c/{conversation_id}/m/2/events")
                 if name == "html"]
    assert any("one two" in html and "three" not in html for html in snapshots), snapshots
