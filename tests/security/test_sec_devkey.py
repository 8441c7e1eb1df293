"""FLASK_DEBUG=1 without SECRET_KEY (issue 9, item 7): never a published key. A random key is made once
per server start, shared by all its workers (instance/dev-secret-key, mode 0600), and the log says so;
a restart makes a new one."""
import os
import stat
import time

import jwt
import requests

from helpers import PASSWORD, make_user
from live import LiveServer, login

KEY_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "instance", "dev-secret-key")
OLD_PUBLISHED_KEY = "insecure-development-key-" + "x" * 16


def _forged(key, user_id=1, version=1):
    now = int(time.time())
    return jwt.encode({"sub": str(user_id), "ver": version, "iat": now, "exp": now + 600}, key, algorithm="HS256")


def test_debug_without_secret_key_uses_a_random_key_per_start_shared_by_workers(app, fresh_db, pg_url, fake_ollama):
    user_id = make_user(app)
    debug = {"FLASK_DEBUG": "1", "SECRET_KEY": ""}
    first = LiveServer(pg_url, fake_ollama.url, workers=2, **debug).start()
    try:
        base = first.url
        forged = requests.get(base + "/conversations", timeout=10,
                              headers={"Authorization": f"Bearer {_forged(OLD_PUBLISHED_KEY, user_id)}"})
        assert forged.status_code == 401
        auth = login(base, "alice", PASSWORD)
        # Two workers: a token made by one verifies in the other, on every request.
        assert {requests.get(base + "/conversations", headers=auth, timeout=10).status_code
                for _ in range(30)} == {200}
        assert stat.S_IMODE(os.stat(KEY_FILE).st_mode) == 0o600
        key = open(KEY_FILE).read().split()[1]
        assert len(key) == 64 and key != OLD_PUBLISHED_KEY
        time.sleep(0.5)
        assert first.log_text().count("random development key made for this server start") == 2  # each worker
    finally:
        first.stop()
    second = LiveServer(pg_url, fake_ollama.url, workers=2, **debug).start()
    try:
        # A new start, a new key: the first start's token is void, and its key is gone from the file.
        assert requests.get(second.url + "/conversations", headers=auth, timeout=10).status_code == 401
        assert open(KEY_FILE).read().split()[1] != key
        assert requests.get(second.url + "/conversations", headers=login(second.url, "alice", PASSWORD),
                            timeout=10).status_code == 200
    finally:
        second.stop()
