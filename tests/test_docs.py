"""/docs: Swagger UI (vendored, served by the app) over /openapi.json, with its own narrowly widened
Content-Security-Policy (data: images) while every other page keeps the strict one; in Chromium it lists the
operations without a CSP violation or a missing file, and "Authorize" works with the OAuth2 password
flow and with a plain bearer token."""
import re
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect

from helpers import PASSWORD, sign_in

ROOT = Path(__file__).resolve().parent.parent


def policy(response):
    return dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))


def test_docs_page_gets_its_own_policy_and_every_other_page_keeps_the_strict_one(client, user):
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.mimetype == "text/html"
    widened = policy(docs)
    # Only what Swagger UI needs: data: images (its icons). Styles and scripts stay files from here.
    assert widened["img-src"] == "'self' data:" and widened["style-src"] == "'self'"
    assert widened["script-src"] == "'self'" and widened["connect-src"] == "'self'"
    assert widened["frame-ancestors"] == "'none'" and widened["object-src"] == "'none'"
    html = docs.get_data(as_text=True)
    assert "<script>" not in html and not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html and "/static/js/docs.js" in html
    assert 'data-spec-url="/openapi.json"' in html
    assert "cdn" not in html.lower() and "unpkg" not in html.lower()

    for path in ("/login", "/openapi.json", "/health", "/static/js/docs.js"):
        strict = policy(client.get(path))
        assert strict == {**widened, "img-src": "'self'"}, path
    start = client.get("/static/js/docs.js").get_data(as_text=True)
    assert "validatorUrl: null" in start
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "LICENSE"):
        assert client.get(f"/static/vendor/swagger-ui/{name}").status_code == 200


def test_settings_and_readme_link_to_the_docs(client, user):
    sign_in(client)
    assert 'href="/docs"' in client.get("/settings").get_data(as_text=True)
    assert "/docs" in (ROOT / "README.md").read_text()


@pytest.fixture
def docs_page(chromium, server):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = []
    page.on("console", lambda message: page.problems.append(message.text) if message.type in {"error", "warning"}
            else None)
    page.on("response", lambda response: page.problems.append(f"{response.status} {response.url}")
            if response.status == 404 else None)
    page.on("requestfailed", lambda request: page.problems.append(f"failed {request.url}"))
    page.goto(server.url + "/docs")
    yield page
    context.close()


def authorize_and_list(page, server):
    """Try it out: GET /conversations with whatever Authorize set; the answer is 200."""
    operation = page.locator("#operations-default-listConversations")
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    with page.expect_response(lambda r: r.url.startswith(server.url + "/conversations")) as listed:
        operation.locator("button.execute").click()
    assert listed.value.status == 200
    assert listed.value.request.headers["authorization"].startswith("Bearer ")


@pytest.mark.browser
def test_swagger_ui_lists_the_operations_and_authorizes_with_a_password(docs_page, server):
    page = docs_page
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    operations = [method for item in spec["paths"].values() for method in item if method in {"get", "post", "patch",
                                                                                              "delete", "put"}]
    expect(page.locator(".opblock")).to_have_count(len(operations), timeout=15000)  # every one listed
    for operation_id in ("login", "chatTurn", "listConversations", "streamMessage"):
        expect(page.locator(f"#operations-default-{operation_id}")).to_be_visible()
    page.locator(".auth-wrapper button.authorize").click()
    dialog = page.locator(".modal-ux")
    password_flow = dialog.locator(".auth-container").filter(has_text="OAuth2Password")
    password_flow.locator("#oauth_username").fill("alice")
    password_flow.locator("#oauth_password").fill(PASSWORD)
    with page.expect_response(lambda r: r.url == server.url + "/auth/login") as token:
        password_flow.locator("button.authorize").click()
    assert token.value.status == 200 and token.value.headers["cache-control"] == "no-store"
    expect(password_flow.locator("button", has_text="Logout")).to_be_visible()
    password_flow.locator("button.btn-done").click()
    authorize_and_list(page, server)
    assert not page.problems, page.problems  # no CSP violation, no 404, no failed request


@pytest.mark.browser
def test_swagger_ui_authorizes_with_a_plain_bearer_token(docs_page, server):
    page = docs_page
    token = requests.post(server.url + "/auth/login", data={"username": "alice", "password": PASSWORD},
                          timeout=10).json()["access_token"]
    expect(page.locator(".opblock").first).to_be_visible(timeout=15000)
    page.locator(".auth-wrapper button.authorize").click()
    bearer = page.locator(".modal-ux .auth-container").filter(has_text="BearerToken")
    bearer.locator("input").fill(token)
    bearer.locator("button.authorize").click()
    expect(bearer.locator("button", has_text="Logout")).to_be_visible()
    bearer.locator("button.btn-done").click()
    authorize_and_list(page, server)
    assert not page.problems, page.problems
