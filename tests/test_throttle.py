"""Failed sign-ins are throttled on both doors together."""
import logging
import time

import pytest

from helpers import PASSWORD, both_databases, csrf_of, make_user

WRONG = "not-the-password"


def api_login(client, username="alice", password=WRONG, **headers):
    return client.post("/auth/login", data={"username": username, "password": password}, headers=headers)


def page_login(client, username="alice", password=WRONG, **extra):
    token = csrf_of(client)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token, **extra})


@pytest.fixture
def limited(make_app):
    """An app allowing 3 failures per address and username, 6 per address."""
    app = make_app(LOGIN_LIMIT_PER_USER="3 per minute", LOGIN_LIMIT_PER_ADDRESS="6 per minute")
    make_user(app)
    make_user(app, "bob")
    return app


def test_guessing_one_password_is_refused_after_the_limit(limited):
    client = limited.test_client()
    assert [api_login(client).status_code for _ in range(3)] == [400, 400, 400]
    refused = api_login(client)
    assert refused.status_code == 429
    error = refused.get_json()  # RFC 6749 §5.2's shape, with a string `error`
    assert error["error"] == "too_many_attempts" and "try again in" in error["error_description"]
    assert error["request_id"] == refused.headers["X-Request-ID"]
    assert 1 <= error["retry_after"] <= 61  # whole seconds, rounded up
    assert refused.headers["Retry-After"] == str(error["retry_after"])
    assert refused.headers["Cache-Control"] == "no-store"
    # While the window lasts even the right password is refused: that is what stops guessing.
    assert api_login(client, password=PASSWORD).status_code == 429
    # Another account from the same address is not locked by alice's failures.
    assert api_login(client, "bob", PASSWORD).status_code == 200


def test_successful_and_malformed_sign_ins_do_not_count(limited):
    client = limited.test_client()
    for _ in range(8):
        assert api_login(client, password=PASSWORD).status_code == 200
        missing = client.post("/auth/login", data={"username": "alice"})
        assert missing.status_code == 400 and missing.get_json()["error"] == "invalid_request"
        repeated = client.post("/auth/login", data={"username": ["alice", "bob"], "password": WRONG})
        assert repeated.status_code == 400 and repeated.get_json()["error"] == "invalid_request"
    assert [api_login(client).status_code for _ in range(4)] == [400, 400, 400, 429]


def test_many_usernames_from_one_address_hit_the_address_limit(limited):
    client = limited.test_client()
    statuses = [api_login(client, f"user{n}").status_code for n in range(6)]
    assert statuses == [400] * 6
    assert api_login(client, "bob", PASSWORD).status_code == 429


def test_page_and_api_share_the_count_and_the_page_says_how_long(limited):
    client = limited.test_client()
    assert api_login(client).status_code == 400
    assert api_login(client).status_code == 400
    assert page_login(client).status_code == 401
    page = page_login(client, password=PASSWORD, next="/settings")
    assert page.status_code == 429
    html = page.get_data(as_text=True)
    assert "Too many failed sign-in attempts" in html and "seconds" in html
    assert 'value="alice"' in html and 'name="next" value="/settings"' in html  # what was typed is kept
    assert 1 <= int(page.headers["Retry-After"]) <= 61
    assert client.get("/settings").status_code == 302  # not signed in


def test_the_limit_lifts_when_the_window_moves_on(make_app):
    app = make_app(LOGIN_LIMIT_PER_USER="2 per 2 seconds")
    make_user(app)
    client = app.test_client()
    assert [api_login(client).status_code for _ in range(3)] == [400, 400, 429]
    time.sleep(2.2)
    assert api_login(client, password=PASSWORD).status_code == 200


def test_empty_limits_turn_throttling_off(make_app):
    app = make_app(LOGIN_LIMIT_PER_USER="", LOGIN_LIMIT_PER_ADDRESS="")
    make_user(app)
    client = app.test_client()
    assert {api_login(client).status_code for _ in range(25)} == {400}


def test_forwarded_addresses_count_apart_only_behind_a_trusted_proxy(make_app):
    # The per-address limit (the per-user one counts a username from any address, by design).
    trusting = make_app(LOGIN_LIMIT_PER_ADDRESS="2 per minute", TRUSTED_PROXIES=1,
                        TRUSTED_PROXY_NETWORKS="127.0.0.1/32")
    make_user(trusting)
    client = trusting.test_client()
    first = {"X-Forwarded-For": "203.0.113.5"}
    assert [api_login(client, f"nobody{n}", **first).status_code for n in range(3)] == [400, 400, 429]
    assert api_login(client, password=PASSWORD, **{"X-Forwarded-For": "203.0.113.6"}).status_code == 200

    # Without TRUSTED_PROXIES the header is anyone's to forge, so it must not reset the count.
    direct = make_app(LOGIN_LIMIT_PER_ADDRESS="2 per minute")
    client = direct.test_client()
    assert [api_login(client, f"other{n}", **first).status_code for n in range(2)] == [400, 400]
    assert api_login(client, password=PASSWORD, **{"X-Forwarded-For": "203.0.113.6"}).status_code == 429


@both_databases
def test_counts_are_shared_by_every_process_and_survive_a_restart(make_app):
    """The counters live in the database, so a second app (another worker, replica or a restart)
    sees the first one's failures; per-process memory would start again from zero."""
    first = make_app(LOGIN_LIMIT_PER_USER="3 per minute")
    make_user(first)
    assert [api_login(first.test_client()).status_code for _ in range(3)] == [400, 400, 400]
    second = make_app(LOGIN_LIMIT_PER_USER="3 per minute")
    assert api_login(second.test_client(), password=PASSWORD).status_code == 429


@both_databases
def test_stored_hits_hide_who_was_tried_and_expire(make_app):
    from sqlalchemy import func, select

    from webapp.extensions import db
    from webapp.models import RateLimitHit
    app = make_app(LOGIN_LIMIT_PER_USER="5 per 1 second", LOGIN_LIMIT_PER_ADDRESS="")
    client = app.test_client()
    api_login(client, "mallory-target")
    with app.app_context():
        keys = db.session.scalars(select(RateLimitHit.key)).all()
    assert len(keys) == 1 and "mallory" not in keys[0] and len(keys[0]) == 64  # a digest, not the name
    time.sleep(1.1)
    api_login(client, "someone-else")  # each new hit sweeps the expired ones
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(RateLimitHit)) == 1


def test_sign_up_makes_a_few_accounts_per_address_then_says_to_wait(make_app):
    app = make_app(SIGNUP_LIMIT_PER_ADDRESS="2 per hour")

    def sign_up(username, confirm="x" * 12):
        client = app.test_client()
        return client.post("/register", data={"username": username, "password": "x" * 12, "confirm": confirm,
                                              "csrf_token": csrf_of(client, "/register")})
    assert {sign_up(f"typo{n}", confirm="y" * 12).status_code for n in range(4)} == {422}  # mistakes don't count
    made = [sign_up(f"user{n}") for n in range(3)]
    assert [r.status_code for r in made] == [302, 302, 429]
    html = made[2].get_data(as_text=True)
    assert "Too many sign-up attempts" in html and 'value="user2"' in html
    assert int(made[2].headers["Retry-After"]) > 60
    assert api_login(app.test_client(), "user2", "x" * 12).status_code == 400  # not created


def test_probing_for_taken_names_counts_toward_the_sign_up_limit(make_app):
    """A person who picks a taken name is told so, but asking "does alice exist?" over and over is
    throttled like making accounts."""
    app = make_app(SIGNUP_LIMIT_PER_ADDRESS="3 per hour")
    make_user(app)

    def sign_up(username):
        client = app.test_client()
        return client.post("/register", data={"username": username, "password": "x" * 12, "confirm": "x" * 12,
                                              "csrf_token": csrf_of(client, "/register")})
    first = sign_up("alice")
    assert first.status_code == 422 and "already exists" in first.get_data(as_text=True)
    assert [sign_up("alice").status_code for _ in range(3)] == [422, 422, 429]
    assert sign_up("someone-new").status_code == 429


def test_a_broken_limit_store_does_not_lock_people_out(make_app, caplog):
    """Fail open: with the counters' table gone (a missed migration, a database hiccup) sign-in still
    answers 200/400 as usual, and the failure is logged."""
    from sqlalchemy import text

    from webapp.extensions import db
    app = make_app(LOGIN_LIMIT_PER_USER="2 per minute")
    make_user(app)
    logging.getLogger("webapp").addHandler(caplog.handler)  # the app's logger does not propagate to root
    with app.app_context():
        db.session.execute(text("ALTER TABLE rate_limit_hits RENAME TO rate_limit_hits_away"))
        db.session.commit()
    try:
        client = app.test_client()
        assert [api_login(client).status_code for _ in range(3)] == [400, 400, 400]
        assert api_login(client, password=PASSWORD).status_code == 200
        assert "rate_limit_hits" in caplog.text
    finally:
        logging.getLogger("webapp").removeHandler(caplog.handler)
        with app.app_context():
            db.session.rollback()
            db.session.execute(text("ALTER TABLE rate_limit_hits_away RENAME TO rate_limit_hits"))
            db.session.commit()
