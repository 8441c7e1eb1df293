"""The chat pages' flows beyond the basics: streaming details, stop/retry, failures told in words,
paging, search without JavaScript, CSRF refusals that read well."""
import json
import re
import time

from helpers import Elements, csrf_of, htmx, make_user, read_sse, send, sign_in


def conversation_of(response):
    return int(response.headers["Location"].rsplit("/", 1)[1])


def stream_url(html):
    return re.search(r'data-stream-url="([^"]+)"', html).group(1)


def timed_sse(browser, path):
    """Events with the time each one arrived (the test client reads the body as it is produced)."""
    response = browser.get(path, buffered=False)
    events, start, buffer = [], time.monotonic(), ""
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            match = re.search(r"^event: (\w+)\ndata: (.*)", frame, re.S | re.M)  # after `id:`/`retry:`
            if match:
                events.append((match.group(1), json.loads(match.group(2)), time.monotonic() - start))
    response.close()
    return events


# ---- streaming -------------------------------------------------------------------------------------

def test_html_snapshots_are_throttled_and_the_end_is_complete(browser, ollama):
    words = [f"w{n} " for n in range(80)]
    ollama.script(chunks=words, delay=0.01)  # ~100 tokens/s: far more tokens than renders
    conversation_id = conversation_of(send(browser, "count"))
    events = timed_sse(browser, f"/c/{conversation_id}/m/2/events")
    html = [e for e in events if e[0] == "html"]
    assert events[-1][0] == "done"
    assert 2 <= len(html) < len(words) / 2
    gaps = [b[2] - a[2] for a, b in zip(html, html[1:], strict=False)]
    assert min(gaps) >= 0.09, gaps  # at most ~10 renders a second
    final = events[-1][1]
    assert final["status"] == "complete" and "w79" in final["html"] and "data-stream-url" not in final["html"]


def test_sse_is_sanitized_html_not_raw_text(browser, ollama):
    ollama.script(chunks=["**bold** ", "<script>alert(1)</script> ", "[x](javascript:alert(1))"], delay=0.15)
    conversation_id = conversation_of(send(browser, "be bad"))
    events = read_sse(browser, f"/c/{conversation_id}/m/2/events")
    for name, data in events:
        for tag, attrs in Elements(json.loads(data)["html"]).found:
            assert tag not in {"script", "img", "iframe"}, (name, tag)
            assert not attrs.get("href", "https:").startswith("javascript"), (name, attrs)
    assert "<strong>bold</strong>" in json.loads(events[-1][1])["html"]


def test_reload_mid_answer_shows_the_partial_text_and_reconnects(browser, ollama):
    ollama.script(chunks=["first part. "] + ["more "] * 30, delay=0.1)
    conversation_id = conversation_of(send(browser, "long"))
    time.sleep(0.6)  # the generation flushes its text so far to the row
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "first part." in page  # what was said so far is on the page at once
    assert 'id="send" class="primary" disabled' in page  # one turn at a time
    url = stream_url(page)
    events = read_sse(browser, url)  # a reconnect replays from the start
    first_text = next(data for name, data in events if name == "html")
    assert "first part." in json.loads(first_text)["html"]
    assert events[-1][0] == "done"
    assert "data-stream-url" not in browser.get(f"/c/{conversation_id}").get_data(as_text=True)


def test_the_stream_keeps_the_sidebar_entry_current(browser, ollama):
    """The entry says "answering…" while the answer streams and loses it at the end, with the new
    message count, so the sidebar never shows a stale state without a reload."""
    ollama.script(chunks=["a ", "b "], delay=0.1)
    first = conversation_of(send(browser, "first chat"))
    read_sse(browser, f"/c/{first}/m/2/events")
    second = conversation_of(send(browser, "second chat"))
    read_sse(browser, f"/c/{second}/m/4/events")
    ollama.script(chunks=["c "] * 5, delay=0.1)
    turn = send(browser, "again", first, **htmx(browser)).get_data(as_text=True)
    # The turn's own answer carries the entry too: a fast answer may be complete before any stream.
    item = rf'<template class="sidebar-item">\s*<li id="conv-{first}" class="conversation-item current">'
    assert re.search(item, turn)
    events = read_sse(browser, f"/c/{first}/m/6/events")
    opening, final = json.loads(events[0][1])["html"], json.loads(events[-1][1])["item"]
    assert events[0][0] == "item" and events[-1][0] == "done"
    for html in (opening, final):
        assert f'id="conv-{first}" class="conversation-item current"' in html and "first chat" in html
    assert "answering…" in opening and "answering…" not in final
    assert "4 msg" in final


def test_stream_of_a_deleted_conversation_says_gone(browser, ollama):
    ollama.script(chunks=["x "] * 40, delay=0.1)
    conversation_id = conversation_of(send(browser, "delete me soon"))
    response = browser.get(f"/c/{conversation_id}/m/2/events", buffered=False)
    browser.post(f"/c/{conversation_id}/delete", data={"csrf_token": browser.csrf})
    body = b"".join(response.response).decode()
    assert "event: gone" in body or "event: done" in body


def test_sse_needs_a_session(client, user):
    response = client.get("/c/1/m/2/events")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


# ---- stop and retry --------------------------------------------------------------------------------

def test_stop_ends_the_answer_and_offers_retry(browser, ollama):
    ollama.script(chunks=["word "] * 60, delay=0.1)
    conversation_id = conversation_of(send(browser, "talk a lot"))
    time.sleep(0.4)
    response = browser.post(f"/c/{conversation_id}/stop", headers=htmx(browser))
    assert response.status_code == 204
    assert ollama.wait_for_event("client_closed", timeout=3) is not None  # the upstream was really closed
    events = read_sse(browser, f"/c/{conversation_id}/m/2/events")
    final = json.loads(events[-1][1])
    assert final["status"] == "cancelled"
    assert "Stopped." in final["html"] and "Retry" in final["html"] and "word" in final["html"]
    # Stopping again (nothing running) is harmless; a plain form goes back to the page.
    again = browser.post(f"/c/{conversation_id}/stop", data={"csrf_token": browser.csrf})
    assert again.status_code == 302 and again.headers["Location"] == f"/c/{conversation_id}"


def test_retry_with_htmx_swaps_in_a_streaming_bubble(browser, ollama):
    ollama.script(fail="status", status=500)
    conversation_id = conversation_of(send(browser, "try me"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    ollama.script(reply="second time lucky")
    response = browser.post(f"/c/{conversation_id}/regenerate", headers=htmx(browser))
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and html.startswith("<article")
    assert "<html" not in html and "data-stream-url" in html
    events = read_sse(browser, stream_url(html))
    assert "second time lucky" in json.loads(events[-1][1])["html"]
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert page.count('class="message user') == 1 and page.count('class="message assistant') == 1


def test_regenerate_while_busy_is_refused_in_words(browser, ollama):
    ollama.script(chunks=["z "] * 30, delay=0.1)
    conversation_id = conversation_of(send(browser, "busy"))
    # Refused in the footer of the answer whose Retry was pressed (see webapp/errors.py's table).
    response = browser.post(f"/c/{conversation_id}/regenerate", data={"message_id": 2}, headers=htmx(browser))
    assert response.headers["HX-Retarget"] == "#answer-error-2"
    assert "already being generated" in response.get_data(as_text=True)
    browser.post(f"/c/{conversation_id}/stop", headers=htmx(browser))


# ---- failures in words -----------------------------------------------------------------------------

def test_model_server_down(make_app):
    app = make_app(OLLAMA_URL="http://127.0.0.1:9")  # nothing listens there
    make_user(app)
    browser = app.test_client()
    browser.csrf = sign_in(browser)
    page = browser.get("/?new=1").get_data(as_text=True)
    assert "Model list unavailable" in page and '<option value="tinyllama" selected>' in page
    assert "Model server unreachable" in browser.get("/status").get_data(as_text=True)
    conversation_id = conversation_of(send(browser, "hello?"))
    events = read_sse(browser, f"/c/{conversation_id}/m/2/events")
    final = json.loads(events[-1][1])
    assert final["status"] == "error"
    assert "can&#39;t be reached" in final["html"] or "can't be reached" in final["html"]
    assert "Retry" in final["html"]
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "hello?" in page  # the prompt is kept


def test_a_model_the_server_does_not_offer_is_told_in_words_in_the_composer(browser, ollama):
    page = browser.get("/?new=1").get_data(as_text=True)
    assert "tinyllama:latest" in page
    token = csrf_of(browser, "/?new=1")
    response = browser.post("/c/new", data={"prompt": "hi", "model": "no-such-model", "csrf_token": token})
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "not a model this server offers" in html and 'id="composer-error"' in html
    assert ">hi</textarea>" in html  # what was typed is kept
    response = browser.post("/c/new", data={"prompt": "hi", "model": "no-such-model", "csrf_token": token},
                            headers={"HX-Request": "true"})
    assert response.headers["HX-Retarget"] == "#composer-error"
    assert "not a model this server offers" in response.get_data(as_text=True)


def test_length_limit_is_mentioned(browser, ollama):
    ollama.script(reply="cut short", done_reason="length")
    conversation_id = conversation_of(send(browser, "go on"))
    events = read_sse(browser, f"/c/{conversation_id}/m/2/events")
    assert "cut at the length limit" in json.loads(events[-1][1])["html"]


def test_too_long_prompt_keeps_the_draft(make_app, ollama):
    app = make_app(MAX_PROMPT_CHARS=20)
    make_user(app)
    browser = app.test_client()
    browser.csrf = sign_in(browser)
    response = send(browser, "this draft is far too long to send")
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "longer than 20 characters" in html and ">this draft is far too long to send</textarea>" in html


def test_csrf_failure_is_a_friendly_page_and_fragment(browser):
    page = browser.post("/c/new", data={"prompt": "no token"})
    assert page.status_code == 400 and "Reload the page" in page.get_data(as_text=True)
    fragment = browser.post("/c/new", data={"prompt": "no token"}, headers={"HX-Request": "true"})
    assert fragment.status_code == 400 and fragment.content_type.startswith("text/plain")
    assert "expired" in fragment.get_data(as_text=True)


# ---- the sidebar and older messages ----------------------------------------------------------------

def seed_conversations(app, count, title="chat"):
    from webapp import service
    from webapp.extensions import db
    from webapp.models import User
    with app.test_request_context():
        owner = db.session.get(User, 1)
        return [service.create_conversation(owner, title=f"{title} {n}").id for n in range(count)]


def test_sidebar_pages_with_a_cursor(app, browser):
    seed_conversations(app, 35)
    page = browser.get("/?new=1").get_data(as_text=True)
    assert page.count('class="conversation-item') == 30
    assert 'hx-trigger="intersect once"' in page
    cursor = re.search(r'hx-get="/sidebar\?cursor=([^"&]+)', page).group(1)
    more = browser.get(f"/sidebar?cursor={cursor}", headers=htmx(browser)).get_data(as_text=True)
    assert more.count('class="conversation-item') == 5 and "load-more" not in more
    assert "chat 0" in more and "chat 34" not in more  # newest first: the oldest come last
    plain = browser.get(f"/?new=1&cursor={cursor}").get_data(as_text=True)  # the no-JS link
    assert plain.count('class="conversation-item') == 5
    assert browser.get("/sidebar?cursor=garbage", headers=htmx(browser)).status_code == 400


def test_search_works_as_a_plain_form(app, browser, ollama):
    ids = seed_conversations(app, 3, "plain")
    conversation_id = conversation_of(send(browser, "about zebras"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    page = browser.get(f"/c/{ids[0]}?q=zebra").get_data(as_text=True)
    sidebar = page.split('id="conversation-list"')[1].split("</ul>")[0]
    assert "about zebras" in sidebar and "plain 1" not in sidebar
    assert 'value="zebra"' in page
    by_text = browser.get("/sidebar?q=ZEBRAS", headers=htmx(browser)).get_data(as_text=True)
    assert "about zebras" in by_text  # the message text matches, case-insensitively


def test_older_messages_load_in_pages(app, browser):
    from webapp.extensions import db
    from webapp.models import Message
    [conversation_id] = seed_conversations(app, 1)
    with app.app_context():
        db.session.add_all(Message(conversation_id=conversation_id, role="user" if n % 2 == 0 else "assistant",
                                   content=f"message number {n}", status="complete") for n in range(50))
        db.session.commit()
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "message number 49" in page and "message number 9<" not in page
    older = re.search(r'hx-get="(/c/\d+/older\?before=\d+)"', page).group(1)
    fragment = browser.get(older, headers=htmx(browser)).get_data(as_text=True)
    assert "message number 0<" in fragment and "message number 49" not in fragment and "<html" not in fragment
    assert "Regenerate" not in fragment  # only the newest answer offers it
    plain = browser.get(older)  # no JavaScript: the page itself, further back
    assert plain.status_code == 302 and "before=" in plain.headers["Location"]
    assert "message number 0<" in browser.get(plain.headers["Location"]).get_data(as_text=True)


def test_system_prompt_reaches_the_model(browser, ollama):
    conversation_id = conversation_of(send(browser, "first"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    response = browser.post(f"/c/{conversation_id}/settings",
                            data={"system_prompt": "Answer like a pirate.", "csrf_token": browser.csrf})
    assert response.status_code == 302
    assert "Answer like a pirate." in browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    send(browser, "second", conversation_id)
    read_sse(browser, f"/c/{conversation_id}/m/4/events")
    messages = ollama.chat_requests[-1]["messages"]
    assert messages[0] == {"role": "system", "content": "Answer like a pirate."}


def test_model_picker_changes_the_conversation_model(browser, ollama):
    conversation_id = conversation_of(send(browser, "first"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    browser.post(f"/c/{conversation_id}/messages",
                 data={"prompt": "again", "model": "llama3.2:latest", "csrf_token": browser.csrf})
    read_sse(browser, f"/c/{conversation_id}/m/4/events")
    assert ollama.chat_requests[-1]["model"] == "llama3.2:latest"
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert '<option value="llama3.2:latest" selected>' in page


def test_user_text_is_escaped_not_rendered(browser, ollama):
    conversation_id = conversation_of(send(browser, "<b>not bold</b> **nor this**"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "&lt;b&gt;not bold&lt;/b&gt; **nor this**" in page


def test_rename_without_javascript_and_empty_title(browser):
    conversation_id = conversation_of(send(browser, "old title"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    response = browser.post(f"/c/{conversation_id}/rename", data={"title": "New title", "csrf_token": browser.csrf})
    assert response.status_code == 302
    assert "New title" in browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    refused = browser.post(f"/c/{conversation_id}/rename", data={"title": "   "}, headers=htmx(browser))
    assert refused.headers["HX-Retarget"] == "#rename-error"  # said under the title, not swallowed
    assert "title must not be empty" in refused.get_data(as_text=True)
    assert "New title" in browser.get(f"/c/{conversation_id}").get_data(as_text=True)  # the old one is kept


def test_pages_need_no_inline_script_style_or_eval(app, browser, ollama):
    conversation_id = conversation_of(send(browser, "```python\nx = 1\n```"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    for path in ("/login", "/?new=1", f"/c/{conversation_id}", "/settings", "/status", "/sidebar"):
        response = browser.get(path)
        html = response.get_data(as_text=True)
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, path  # every script is a file
        assert " style=" not in html and "<style" not in html, path  # style-src 'self' forbids them
        assert "hx-on" not in html and "javascript:" not in html, path  # hx-on needs eval
        csp = response.headers["Content-Security-Policy"]
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert '"allowEval": false' in page and '"includeIndicatorStyles": false' in page
    assert "hx-headers='{\"X-CSRFToken\": \"" in page


def test_export_link_downloads_the_conversation(browser, ollama):
    ollama.script(reply="a reply worth keeping")
    conversation_id = conversation_of(send(browser, "keep this"))
    read_sse(browser, f"/c/{conversation_id}/m/2/events")
    page = browser.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert f'href="/c/{conversation_id}/export" download' in page
    download = browser.get(f"/c/{conversation_id}/export")
    assert download.status_code == 200 and download.mimetype == "text/markdown"
    assert "## You\n\nkeep this" in download.get_data(as_text=True)
    assert "a reply worth keeping" in download.get_data(as_text=True)
    assert browser.get("/c/999/export").status_code == 404
