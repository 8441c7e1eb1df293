"""Limits are taken atomically before the work, on both databases: N simultaneous attempts against a
limit of L let exactly L reach the password check, whatever the interleaving."""
import threading

from helpers import PASSWORD, both_databases, make_user

pytestmark = both_databases


def test_simultaneous_wrong_passwords_pass_the_limit_exactly(make_app):
    app = make_app(LOGIN_LIMIT_PER_USER="5 per minute", LOGIN_LIMIT_PER_ADDRESS="")
    make_user(app)
    statuses, barrier = [], threading.Barrier(16)

    def attempt(n):
        client = app.test_client()
        barrier.wait()
        statuses.append(client.post("/auth/login", data={"username": "alice", "password": f"guess{n}"}).status_code)
    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [400] * 5 + [429] * 11  # 400: invalid_grant


def test_old_style_session_cookies_sign_nobody_in(make_app):
    """Cookies from before server-side sessions held 'user_id:token_version'; they are refused."""
    app = make_app()
    make_user(app)
    client = app.test_client()
    with client.session_transaction() as session:
        session["_user_id"] = "1:1"
        session["_fresh"] = True
    assert client.get("/settings").status_code == 302
    with client.session_transaction() as session:
        session["_user_id"] = "s:made-up-token"
    assert client.get("/settings").status_code == 302
    assert client.post("/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
