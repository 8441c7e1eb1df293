"""The chat page's own JavaScript in real headless Chromium: infinite scroll in the sidebar, Retry
swapped in place, keyboard use of the phone sidebar, drafts kept per chat. (The main end-to-end flows
are in test_browser.py.)"""
import pytest
from playwright.sync_api import expect

from helpers import ask, last_answer, sign_in_page

pytestmark = pytest.mark.browser


def seed_conversations(app, count):
    from webapp import service
    from webapp.extensions import db
    from webapp.models import User
    with app.test_request_context():
        owner = db.session.get(User, 1)
        for n in range(count):
            service.create_conversation(owner, title=f"seeded chat {n}")


def test_sidebar_loads_more_when_scrolled(app, page):
    seed_conversations(app, 45)
    sign_in_page(page)
    items = page.locator("#conversation-list li.conversation-item")
    expect(items).to_have_count(30)
    assert page.locator("#conversation-list li.load-more").count() == 1  # not fetched before it is seen
    items.last.scroll_into_view_if_needed()  # brings the "load more" row into view
    expect(items).to_have_count(45)
    expect(page.locator("#conversation-list")).to_contain_text("seeded chat 0")


def test_retry_replaces_the_answer_in_place_and_old_answers_lose_it(page, ollama):
    sign_in_page(page)
    ask(page, "first question")
    expect(last_answer(page).locator(".stats")).to_be_visible()
    ollama.script(reply="a regenerated answer", delay=0.05)
    last_answer(page).get_by_role("button", name="Regenerate").click()
    expect(last_answer(page)).to_contain_text("a regenerated answer")
    expect(page.locator("article.message.assistant")).to_have_count(1)
    expect(page).to_have_url(page.url)  # no page reload needed
    ollama.script(reply="second answer")
    ask(page, "second question")
    expect(last_answer(page)).to_contain_text("second answer")
    expect(page.get_by_role("button", name="Regenerate")).to_have_count(1)  # only the newest answer


def test_phone_sidebar_by_keyboard(page):
    page.set_viewport_size({"width": 360, "height": 740})
    sign_in_page(page)
    expect(page.locator("#search")).to_be_hidden()  # out of the tab order while closed
    toggle = page.get_by_role("button", name="Show conversations")
    toggle.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#search")).to_be_focused()
    expect(page.get_by_role("button", name="Hide conversations")).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("Escape")
    expect(page.locator("#search")).to_be_hidden()
    expect(page.get_by_role("button", name="Show conversations")).to_be_focused()


def test_stale_csrf_token_is_explained_and_the_text_kept(page, ollama):
    sign_in_page(page)
    page.wait_for_selector("html[data-js-ready]", state="attached")
    page.evaluate("document.body.setAttribute('hx-headers', '{\"X-CSRFToken\": \"stale\"}'); "
                  "document.querySelectorAll('input[name=csrf_token]').forEach(i => i.value = 'stale')")
    page.locator("#prompt").fill("please keep me")
    page.locator("#prompt").press("Enter")
    expect(page.locator("#composer-error")).to_contain_text("expired")
    expect(page.locator("#prompt")).to_have_value("please keep me")
    expect(page.locator("#send")).to_be_enabled()
    page.reload()  # the reload the message asks for keeps the text too (a fresh token, the draft kept)
    expect(page.locator("#prompt")).to_have_value("please keep me")
    page.locator("#prompt").press("Enter")
    page.wait_for_url("**/c/*")
    expect(page.locator("article.message.user").last).to_contain_text("please keep me")


def test_drafts_survive_a_reload_until_sent_and_stay_with_their_chat(page, ollama):
    sign_in_page(page)
    page.wait_for_selector("html[data-js-ready]", state="attached")
    prompt = page.locator("#prompt")
    prompt.fill("a long question I have not finished")
    page.reload()
    expect(prompt).to_have_value("a long question I have not finished")
    prompt.press("Enter")
    page.wait_for_url("**/c/*")
    expect(last_answer(page).locator(".stats")).to_be_visible()
    expect(prompt).to_have_value("")
    prompt.fill("a follow-up for this chat only")
    page.locator("a.new-chat").click()
    page.wait_for_url("**/?new=1")
    expect(prompt).to_have_value("")  # the other chat's draft stays with that chat
    page.locator("#conversation-list a").first.click()
    page.wait_for_url("**/c/*")
    expect(prompt).to_have_value("a follow-up for this chat only")
    prompt.press("Enter")
    expect(page.locator("article.message.user").last).to_contain_text("a follow-up for this chat only")
    expect(last_answer(page).locator(".stats")).to_be_visible()
    page.reload()
    expect(prompt).to_have_value("")  # sent: the draft is gone
