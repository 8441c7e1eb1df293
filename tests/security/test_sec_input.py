"""Hostile input answers 400/422/404, never 500 (issue 9, item 13), against gunicorn on PostgreSQL:
deep nesting, lone UTF-16 surrogates, digits Python calls digits but nobody else does, and ids
beyond the 32-bit columns, in bodies, query strings, cursors and paths."""
import base64
import json

import requests

from helpers import PASSWORD, make_user
from live import login


def _post(base, path, auth, raw):
    return requests.post(base + path, data=raw, headers={**auth, "Content-Type": "application/json"}, timeout=30)


def _error(response):
    return response.json()["error"]


def test_deep_nesting_is_a_bad_request(app, fresh_db, live_server):
    make_user(app)
    base, auth = live_server.url, login(live_server.url, "alice", PASSWORD)
    brackets = _post(base, "/chat/", auth, "[" * 100_000)
    assert brackets.status_code == 400 and _error(brackets)["code"] == "malformed_json"
    deep_options = '{"prompt":"hi","options":' + '{"a":' * 30_000 + "1" + "}" * 30_000 + "}"  # 180 kB
    deep_lists = '{"prompt":"hi","options":{"a":' + "[" * 30_000 + "]" * 30_000 + "}}"
    for path in ("/chat/", "/conversations", "/conversations/1/regenerate"):
        for raw in (deep_options, deep_lists):
            response = _post(base, path, auth, raw)
            assert response.status_code == 400, (path, response.text[:200])
    # Still fine for everyone afterwards (no worker died).
    assert requests.get(base + "/conversations", headers=auth, timeout=10).status_code == 200


def test_a_lone_surrogate_is_refused_naming_its_field(app, fresh_db, live_server):
    make_user(app)
    base, auth = live_server.url, login(live_server.url, "alice", PASSWORD)
    cases = [("/chat/", '{"prompt": "x\\ud800"}', "prompt"),
             ("/conversations", '{"title": "x\\udfff"}', "title"),
             ("/conversations", '{"system_prompt": "\\ud800\\ud800"}', "system_prompt"),
             ("/chat/", '{"prompt": "hi", "model": "m\\udc00"}', "model")]
    for path, raw, field in cases:
        response = _post(base, path, auth, raw)
        assert response.status_code == 422, (raw, response.text)
        assert _error(response)["field"] == field
    created = _post(base, "/conversations", auth, '{"title": "ok"}').json()
    renamed = requests.patch(f"{base}/conversations/{created['id']}", data='{"title": "\\ud800"}',
                             headers={**auth, "Content-Type": "application/json"}, timeout=10)
    assert renamed.status_code == 422 and _error(renamed)["field"] == "title"
    # A proper pair (an emoji written as JSON escapes) is text, and is kept.
    emoji = _post(base, "/conversations", auth, '{"title": "smile \\ud83d\\ude00"}')
    assert emoji.status_code == 201 and emoji.json()["title"] == "smile \U0001F600"


def test_odd_digits_and_huge_ids_are_refused_or_not_found(app, fresh_db, live_server):
    make_user(app)
    base, auth = live_server.url, login(live_server.url, "alice", PASSWORD)
    conversation = _post(base, "/conversations", auth, '{"title": "mine"}').json()["id"]
    for query in ("limit=\u00b2", "limit=\u0663", "limit=99999999999999999999", "cursor=%C2%B2"):
        response = requests.get(f"{base}/conversations?{query}", headers=auth, timeout=10)
        assert response.status_code == 400, (query, response.text)
    for query in ("before=\u00b2", "limit=\u00b2", "before=2147483648", "before=0"):
        response = requests.get(f"{base}/conversations/{conversation}?{query}", headers=auth, timeout=10)
        assert response.status_code == 400, (query, response.text)
    for stamp_id in ("2147483648", "9223372036854775808", "-99999999999999999999", "-2147483649", "\u00b2",
                     "2026-01-01T00:00:00+00:00|1", "1\x00"):
        cursor = base64.urlsafe_b64encode(f"2026-01-01T00:00:00+00:00|{stamp_id}".encode()).decode()
        response = requests.get(f"{base}/conversations", params={"cursor": cursor}, headers=auth, timeout=10)
        assert response.status_code in (200, 400), (stamp_id, response.text)
    for stamp in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-01-01", "2026-13-01T00:00"):
        cursor = base64.urlsafe_b64encode(f"{stamp}|5".encode()).decode()
        response = requests.get(f"{base}/conversations", params={"cursor": cursor}, headers=auth, timeout=10)
        assert response.status_code in (200, 400), (stamp_id, response.text)
    for path in ("/conversations/2147483648", "/conversations/99999999999999999999999",
                 f"/conversations/{conversation}/messages/4294967296",
                 "/conversations/2147483648/export"):
        response = requests.get(base + path, headers=auth, timeout=10)
        assert response.status_code == 404, (path, response.text)
    too_big = _post(base, "/chat/", auth, json.dumps({"prompt": "hi", "conversation_id": 2**31}))
    assert too_big.status_code in (404, 422)
    # The pages: the same numbers in their query strings and paths.
    browser = requests.Session()
    from helpers import page_sign_in
    page_sign_in(base, "alice", PASSWORD, session=browser)
    for path in (f"/c/{conversation}?before=\u00b2", f"/c/{conversation}?before=2147483648",
                 "/sidebar?cursor=%C2%B2&current=99999999999", "/c/2147483648",
                 f"/c/{conversation}/older?before=99999999999"):
        response = browser.get(base + path, timeout=10, allow_redirects=False)
        assert response.status_code < 500, (path, response.status_code)
