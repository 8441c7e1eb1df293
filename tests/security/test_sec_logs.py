"""Log injection (issue 9, item 14): a URL path, a model name or a username carrying CR/LF cannot
write a line of its own into the server's log; control characters are escaped in every record."""
import time

import requests

from helpers import PASSWORD, make_user
from live import login


def _lines_starting_with(text, marker):
    return [line for line in text.splitlines() if line.startswith(marker)]


def test_newlines_in_paths_models_and_usernames_are_escaped(app, fresh_db, live_server, ollama):
    make_user(app)
    base = live_server.url
    auth = login(base, "alice", PASSWORD)
    assert requests.get(base + "/x%0aFORGED-PATH%0d%0aFORGED-CRLF", timeout=10).status_code == 404
    requests.get(base + "/conversations/x%0AFORGED-API", headers=auth, timeout=10)
    # A model name with a line break reaches the generation's log line (the model server refuses it).
    requests.post(base + "/chat/", json={"prompt": "hi", "model": "tinyllama\nFORGED-MODEL outcome=complete"},
                  headers=auth, timeout=30)
    requests.post(base + "/auth/login", data={"username": "bob\nFORGED-USER", "password": "x"}, timeout=30)
    time.sleep(1.0)  # access lines are written when each response is closed
    log = live_server.log_text()
    forged = [line for marker in ("FORGED", "\u2028") for line in _lines_starting_with(log, marker)]
    assert forged == []
    # The path is still readable in the access line, with the line break shown as an escape.
    assert "GET /x\\x0aFORGED-PATH\\x0d\\x0aFORGED-CRLF 404" in log
