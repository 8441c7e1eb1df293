"""Open streams end within 5 s of their credential ending (issue 9: "an SSE stream opened before
/auth/revoke keeps delivering"): sign out everywhere, a revoked token, a disabled account. One
re-check per worker per tick (webapp/stream_auth.py), not a query per stream."""
import re
import threading
import time

import pytest
import requests

from helpers import PASSWORD, csrf, make_user, page_sign_in
from live import login, sse_events

LONG_ANSWER = dict(chunks=["word "] * 300, delay=0.1)  # ~30 s of tokens, each well within the read timeout
ENDS_WITHIN = 5.0


def _read_until_end(events, on_first_token):
    """Read (event, data) pairs until the stream ends; call on_first_token once. Returns the events
    and the seconds from that call to the end of the stream."""
    seen, acted_at = [], None
    for name, data in events:
        seen.append((name, data))
        if acted_at is None and name in ("token", "html"):
            on_first_token()
            acted_at = time.monotonic()
    return seen, (time.monotonic() - acted_at) if acted_at else None


def _stop(base, username="alice"):
    """End the (server-owned) generation so the next test starts from quiet tables."""
    auth = login(base, username, PASSWORD)
    for conversation in requests.get(base + "/conversations", headers=auth, timeout=10).json()["conversations"]:
        requests.post(f"{base}/conversations/{conversation['id']}/stop", headers=auth, timeout=10)


@pytest.mark.parametrize("ending", ["logout-all", "revoke", "set-password"])
def test_an_api_stream_ends_when_its_token_does(app, fresh_db, live_server, ollama, ending):
    make_user(app)
    ollama.script(**LONG_ANSWER)
    base = live_server.url
    auth = login(base, "alice", PASSWORD)
    response = requests.post(base + "/chat/", json={"prompt": "talk", "stream": True}, headers=auth,
                             stream=True, timeout=(5, 15))
    assert response.status_code == 200

    def end_the_token():
        if ending == "set-password":  # the password changed (here by the operator; the pages do the same)
            result = app.test_cli_runner().invoke(args=["set-password", "alice"], input=PASSWORD + "\n")
            assert result.exit_code == 0, result.output
        else:
            form = {"token": auth["Authorization"].split()[1]} if ending == "revoke" else None  # RFC 7009
            assert requests.post(f"{base}/auth/{ending}", headers=auth, data=form, timeout=10).status_code in (200, 204)

    seen, seconds = _read_until_end(sse_events(response), end_the_token)
    assert seconds is not None and seconds < ENDS_WITHIN, seconds
    assert seen[-1][0] == "signed_out" and seen[-1][1]["code"] == "signed_out"
    assert not any(name == "done" for name, _ in seen)  # it ended long before the answer did
    _stop(base)


def test_a_page_stream_ends_when_the_account_signs_out_everywhere_elsewhere(app, fresh_db, live_server, ollama):
    make_user(app)
    ollama.script(**LONG_ANSWER)
    base = live_server.url
    browser, _ = page_sign_in(base, "alice", PASSWORD)
    page = browser.post(base + "/c/new", data={"prompt": "talk", "csrf_token": csrf(browser, base + "/")},
                        timeout=10)
    stream_url = re.search(r'data-stream-url="([^"]+)"', page.text).group(1)
    response = browser.get(base + stream_url, stream=True, timeout=(5, 15))
    assert response.headers["Content-Type"].startswith("text/event-stream")

    def from_another_device():  # a program with a token signs the account out everywhere
        auth = login(base, "alice", PASSWORD)
        assert requests.post(base + "/auth/logout-all", headers=auth, timeout=10).status_code == 204

    seen, seconds = _read_until_end(sse_events(response), from_another_device)
    assert seconds is not None and seconds < ENDS_WITHIN, seconds
    assert seen[-1][0] == "signed_out"
    _stop(base)


def test_streams_end_when_an_admin_disables_the_account(app, fresh_db, live_server, ollama):
    make_user(app)
    make_user(app, "bob")
    ollama.script(**LONG_ANSWER)
    base = live_server.url
    auth = login(base, "alice", PASSWORD)
    bob = login(base, "bob", PASSWORD)
    streams = {name: requests.post(base + "/chat/", json={"prompt": "talk", "stream": True}, headers=headers,
                                   stream=True, timeout=(5, 15)) for name, headers in (("alice", auth), ("bob", bob))}
    bob_events = sse_events(streams["bob"])
    bob_seen = []

    def read_bob():
        try:
            for item in bob_events:
                bob_seen.append((time.monotonic(), item[0]))
        except (requests.RequestException, AttributeError):  # closed by the test at its end
            pass

    reader = threading.Thread(target=read_bob, daemon=True)
    reader.start()

    def disable():
        result = app.test_cli_runner().invoke(args=["disable-user", "alice"])
        assert result.exit_code == 0 and "disabled 'alice'" in result.output

    seen, seconds = _read_until_end(sse_events(streams["alice"]), disable)
    ended = time.monotonic()
    assert seconds is not None and seconds < ENDS_WITHIN, seconds
    assert seen[-1] == ("signed_out", {"code": "account_disabled", "message": "this account has been disabled"})
    # The disabled account can no longer sign in; bob's stream, in the same workers, goes on.
    assert requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD},
                         timeout=10).status_code == 400
    time.sleep(1.0)
    assert any(at > ended and name == "token" for at, name in bob_seen)
    streams["bob"].close()
    _stop(base, "bob")
