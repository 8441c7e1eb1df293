"""Password hashes run in the password pool, never while the request holds a database connection,
and never more at once than the pool's slots (so a burst queues instead of starving the rest)."""
import threading
import time

import pytest
from test_web_pages import csrf_of, sign_in
from werkzeug.security import check_password_hash, generate_password_hash

from helpers import PASSWORD, both_databases, make_user

pytestmark = both_databases


@pytest.fixture
def watched(make_app, monkeypatch):
    """Record, for every hash, the request pool's checked-out connections and the running count."""
    from webapp.auth import hashing
    from webapp.extensions import db
    app = make_app()
    make_user(app)
    with app.app_context():
        engine = db.engine
    seen = {"checked_out": [], "threads": set(), "running": 0, "most": 0}
    lock = threading.Lock()

    def watch(real):
        def wrapper(*args):
            with lock:
                seen["checked_out"].append(engine.pool.checkedout())
                seen["threads"].add(threading.current_thread().name)
                seen["running"] += 1
                seen["most"] = max(seen["most"], seen["running"])
            try:
                time.sleep(0.05)  # long enough for overlaps to show
                return real(*args)
            finally:
                with lock:
                    seen["running"] -= 1
        return wrapper
    monkeypatch.setattr(hashing, "check_password_hash", watch(check_password_hash))
    monkeypatch.setattr(hashing, "generate_password_hash", watch(generate_password_hash))
    return app, seen


def test_every_door_hashes_with_no_connection_held(watched):
    app, seen = watched
    client = app.test_client()
    assert client.post("/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
    assert client.post("/auth/login", data={"username": "alice", "password": "wrong!"}).status_code == 400
    assert client.post("/auth/login", data={"username": "nobody", "password": "wrong!"}).status_code == 400
    token = sign_in(client)  # the page
    assert client.post("/settings", data={"csrf_token": token, "current_password": PASSWORD,
                                          "new_password": "n" * 12, "confirm": "n" * 12}).status_code == 200
    newcomer = app.test_client()
    assert newcomer.post("/register", data={"username": "bob", "password": "b" * 12, "confirm": "b" * 12,
                                            "csrf_token": csrf_of(newcomer, "/register")}).status_code == 302
    assert len(seen["checked_out"]) >= 7
    assert set(seen["checked_out"]) == {0}, seen["checked_out"]
    assert all(name.startswith("password-hash") for name in seen["threads"])  # the pool, not the request


def test_a_burst_queues_on_the_pool_slots(watched):
    from webapp.auth.hashing import _slots
    app, seen = watched

    statuses = []

    def attempt(n):
        statuses.append(app.test_client().post("/auth/login", data={"username": f"user{n}",
                                                                     "password": "wrong!"}).status_code)
    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [400] * 12  # invalid_grant
    assert len(seen["checked_out"]) >= 12
    assert seen["most"] <= _slots()  # the others waited their turn

