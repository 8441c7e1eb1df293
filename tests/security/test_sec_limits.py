"""The remaining limits on the live app: the settings page's password check, sign-up probes, a
broken limit store that fails open but says so in the app's log, and the setup token's log line."""
import requests
from sqlalchemy import create_engine, text

from helpers import PASSWORD, csrf, make_user, page_sign_in


def test_the_settings_password_check_is_throttled(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    browser, _ = page_sign_in(base, "alice", PASSWORD)
    token = csrf(browser, base + "/settings")

    def change(current):
        return browser.post(base + "/settings", data={"csrf_token": token, "current_password": current,
                                                      "new_password": "y" * 12, "confirm": "y" * 12}).status_code
    statuses = [change(f"guess-{n}") for n in range(12)]
    assert statuses[:10] == [422] * 10 and statuses[10:] == [429, 429]
    assert change(PASSWORD) == 429  # the window has not moved on: even the right one waits


def test_register_probes_are_told_but_throttled(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url

    def probe():
        session = requests.Session()
        return session.post(base + "/register", data={"username": "alice", "password": "x" * 12, "confirm": "x" * 12,
                                                      "csrf_token": csrf(session, base + "/register")})
    answers = [probe() for _ in range(6)]
    assert [a.status_code for a in answers] == [422] * 5 + [429]
    assert "already exists" in answers[0].text and "Too many sign-up attempts" in answers[5].text


def test_a_broken_limit_store_fails_open_and_logs_a_warning(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    engine = create_engine(fresh_db)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE rate_limit_hits RENAME TO rate_limit_hits_away"))
    try:
        statuses = [requests.post(base + "/auth/login", data={"username": "alice", "password": "wrong"}).status_code
                    for _ in range(3)]
        assert statuses == [400, 400, 400]  # invalid_grant (RFC 6749)
        assert requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE rate_limit_hits_away RENAME TO rate_limit_hits"))
        engine.dispose()
    log = live_server.log_text()
    assert "WARNING" in log and "limit store failed" in log and "rate_limit_hits" in log


def test_the_setup_token_is_in_the_log_while_no_admin_exists(app, fresh_db, live_server):
    from webapp.auth.setup import setup_token
    with app.app_context():
        token = setup_token()
    assert f"setup token {token}" in live_server.log_text()  # written when the workers started
