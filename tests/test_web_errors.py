"""Each page action shows its error where the person looks (the table in webapp/errors.py): with
htmx the words are swapped into the action's slot; a plain form gets the page again with them there."""
import re

from helpers import csrf_of, htmx, send


def new_conversation(browser, ollama):
    ollama.script(reply="done")
    response = send(browser, "hello")
    conversation_id = int(response.headers["Location"].rsplit("/", 1)[1])
    answer = int(re.findall(r'id="message-(\d+)"', browser.get(f"/c/{conversation_id}").get_data(as_text=True))[-1])
    return conversation_id, answer


def settle(browser, conversation_id):
    """Wait until the conversation's answer is final (its page carries no stream any more)."""
    import time
    deadline = time.monotonic() + 5
    while "data-stream-url" in browser.get(f"/c/{conversation_id}").get_data(as_text=True):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_composer_errors_go_above_the_composer(browser, ollama):
    conversation_id, _ = new_conversation(browser, ollama)
    settle(browser, conversation_id)
    response = send(browser, "   ", conversation_id, **htmx(browser))
    assert response.headers["HX-Retarget"] == "#composer-error"
    assert "prompt must not be empty" in response.get_data(as_text=True)
    page = send(browser, "x" * 40_000, conversation_id)
    html = page.get_data(as_text=True)
    assert page.status_code == 422
    slot = re.search(r'<div id="composer-error"[^>]*>(.*?)</div>', html, re.S).group(1)
    assert "longer than" in slot
    assert "x" * 40_000 in html  # what was typed is kept


def test_rename_errors_go_under_the_title(browser, ollama):
    conversation_id, _ = new_conversation(browser, ollama)
    data = {"title": "   ", "csrf_token": browser.csrf}
    response = browser.post(f"/c/{conversation_id}/rename", data=data, headers=htmx(browser))
    assert response.headers["HX-Retarget"] == "#rename-error"
    assert "title must not be empty" in response.get_data(as_text=True)
    page = browser.post(f"/c/{conversation_id}/rename", data=data)
    slot = re.search(r'<div id="rename-error"[^>]*>(.*?)</div>', page.get_data(as_text=True), re.S).group(1)
    assert page.status_code == 422 and "title must not be empty" in slot


def test_system_prompt_errors_go_into_the_settings_panel(browser, ollama):
    conversation_id, _ = new_conversation(browser, ollama)
    data = {"system_prompt": "y" * 9000, "csrf_token": browser.csrf}
    response = browser.post(f"/c/{conversation_id}/settings", data=data, headers=htmx(browser))
    assert response.headers["HX-Retarget"] == "#settings-error"
    page = browser.post(f"/c/{conversation_id}/settings", data=data)
    html = page.get_data(as_text=True)
    slot = re.search(r'<div id="settings-error"[^>]*>(.*?)</div>', html, re.S).group(1)
    assert page.status_code == 422 and "system_prompt is longer than 8000" in slot
    assert '<details class="conversation-settings" open>' in html  # the panel is open to show it


def test_retry_and_stop_errors_go_into_the_answers_footer(browser, ollama):
    conversation_id, answer = new_conversation(browser, ollama)
    settle(browser, conversation_id)
    # Stop after the answer ended by itself: said in that answer's footer.
    response = browser.post(f"/c/{conversation_id}/stop", data={"csrf_token": browser.csrf, "message_id": answer},
                            headers=htmx(browser))
    assert response.headers["HX-Retarget"] == f"#answer-error-{answer}"
    assert "already ended" in response.get_data(as_text=True)
    # Retry while another answer runs: refused, in the footer of the answer whose Retry was pressed.
    ollama.script(reply="slow " * 30, delay=0.05)
    send(browser, "keep going", conversation_id, **htmx(browser))
    data = {"csrf_token": browser.csrf, "message_id": answer}
    response = browser.post(f"/c/{conversation_id}/regenerate", data=data, headers=htmx(browser))
    assert response.headers["HX-Retarget"] == f"#answer-error-{answer}"
    assert "already being generated" in response.get_data(as_text=True)
    page = browser.post(f"/c/{conversation_id}/regenerate", data=data)
    html = page.get_data(as_text=True)
    slot = re.search(rf'<div id="answer-error-{answer}"[^>]*>(.*?)</div>', html, re.S).group(1)
    assert page.status_code == 409 and "already being generated" in slot
    browser.post(f"/c/{conversation_id}/stop", data={"csrf_token": csrf_of(browser, f"/c/{conversation_id}")})
    settle(browser, conversation_id)


def test_unknown_ids_are_the_not_found_page_on_every_action(browser):
    for path in ("/c/999/rename", "/c/999/settings", "/c/999/stop", "/c/999/regenerate", "/c/999/messages"):
        response = browser.post(path, data={"csrf_token": browser.csrf, "title": "x", "prompt": "x"})
        assert response.status_code == 404 and "There is nothing here" in response.get_data(as_text=True), path
