"""Sign-out signs out: copies of cookies die with the server-side session; remember-me is short,
bound to its session and rotated on use; sign-out everywhere and password changes end everything."""
import re
import time

import requests

from helpers import PASSWORD, api_sign_in, csrf, make_user, page_sign_in, signed_in


def _copy(cookies, *names):
    jar = requests.Session()
    for cookie in cookies:
        if cookie.name in names:
            jar.cookies.set(cookie.name, cookie.value, domain=cookie.domain, path=cookie.path)
    return jar


def test_a_session_cookie_saved_before_logout_is_refused_after(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    browser, response = page_sign_in(base, "alice", PASSWORD)
    assert response.status_code == 302
    token = csrf(browser, base + "/settings")
    stolen = _copy(browser.cookies, "session")
    assert signed_in(stolen, base)
    assert browser.post(base + "/logout", data={"csrf_token": token}, allow_redirects=False).status_code == 302
    assert not signed_in(stolen, base)
    # Nor does it work for a state change with the CSRF token it carried (flask-login #480).
    change = stolen.post(base + "/settings", data={"csrf_token": token, "current_password": PASSWORD,
                                                   "new_password": "x" * 12, "confirm": "x" * 12},
                         allow_redirects=False)
    assert change.status_code in (302, 400) and "/login" in change.headers.get("Location", "/login")
    assert page_sign_in(base, "alice", PASSWORD)[1].status_code == 302  # the password was not changed


def test_a_remember_cookie_dies_with_its_session_and_is_rotated_on_use(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    browser, response = page_sign_in(base, "alice", PASSWORD, remember=True)
    remember = next(c for c in browser.cookies if c.name == "remember_token")
    # Short: REMEMBER_DAYS (14) rather than flask-login's 365.
    lifetime_days = (remember.expires - time.time()) / 86400
    assert 13 < lifetime_days <= 14.01

    # Used alone (the browser was closed), it restores the session and is replaced by a new one.
    first_copy = _copy(browser.cookies, "remember_token")
    restored = first_copy.get(base + "/settings", allow_redirects=False)
    assert restored.status_code == 200
    rotated = restored.cookies.get("remember_token")
    assert rotated and rotated != remember.value
    # The old value is spent: a thief replaying it is refused.
    assert not signed_in(_copy(browser.cookies, "remember_token"), base)

    # Sign-out ends the session; the rotated remember cookie dies with it.
    token = csrf(first_copy, base + "/settings")
    saved = _copy(first_copy.cookies, "remember_token")
    first_copy.post(base + "/logout", data={"csrf_token": token})
    assert not signed_in(saved, base)


def test_sign_out_everywhere_ends_sessions_and_tokens_and_the_settings_page_lists_sessions(app, fresh_db,
                                                                                         live_server):
    make_user(app)
    base = live_server.url
    laptop, _ = page_sign_in(base, "alice", PASSWORD)
    phone, _ = page_sign_in(base, "alice", PASSWORD, session=requests.Session())
    phone.headers["User-Agent"] = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0) Safari/604.1"
    assert signed_in(phone, base)
    page = laptop.get(base + "/settings").text
    assert page.count('/revoke"') == 2 and "(this browser)" in page and "127.0.0.1" in page

    # Per-session sign-out from the laptop ends the phone's session only.
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    other = [re.search(r"/settings/sessions/(\d+)/revoke", row).group(1) for row in rows
             if "/revoke" in row and "(this browser)" not in row]
    assert len(other) == 1
    token = csrf(laptop, base + "/settings")
    ended = laptop.post(f"{base}/settings/sessions/{other[0]}/revoke", data={"csrf_token": token},
                        allow_redirects=False)
    assert ended.status_code == 302 and ended.headers["Location"].endswith("/settings")
    assert not signed_in(phone, base) and signed_in(laptop, base)
    # Someone else's session id is a 404, not a way to sign other people out.
    assert laptop.post(f"{base}/settings/sessions/999999/revoke", data={"csrf_token": token}).status_code == 404

    # Sign out everywhere over the API: browser sessions and every bearer token end.
    bearer = api_sign_in(base, "alice", PASSWORD).json()["access_token"]
    other = requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).json()["access_token"]
    assert requests.post(base + "/auth/logout-all", headers={"Authorization": f"Bearer {bearer}"}).status_code == 204
    assert not signed_in(laptop, base)
    for token in (bearer, other):
        assert requests.get(base + "/conversations", headers={"Authorization": f"Bearer {token}"}).status_code == 401

    # And the button on the settings page.
    laptop, _ = page_sign_in(base, "alice", PASSWORD)
    phone, _ = page_sign_in(base, "alice", PASSWORD, session=requests.Session())
    bearer = api_sign_in(base, "alice", PASSWORD).json()["access_token"]
    out = laptop.post(base + "/logout-all", data={"csrf_token": csrf(laptop, base + "/settings")},
                      allow_redirects=False)
    assert out.status_code == 302 and "/login" in out.headers["Location"]
    assert not signed_in(laptop, base) and not signed_in(phone, base)
    assert requests.get(base + "/conversations", headers={"Authorization": f"Bearer {bearer}"}).status_code == 401


def test_a_password_change_ends_every_other_session_and_token(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    laptop, _ = page_sign_in(base, "alice", PASSWORD)
    phone, _ = page_sign_in(base, "alice", PASSWORD, session=requests.Session())
    bearer = api_sign_in(base, "alice", PASSWORD).json()["access_token"]
    changed = laptop.post(base + "/settings", data={"csrf_token": csrf(laptop, base + "/settings"),
                                                    "current_password": PASSWORD, "new_password": "a new password!",
                                                    "confirm": "a new password!"})
    assert changed.status_code == 200 and "was changed" in changed.text
    assert signed_in(laptop, base) and not signed_in(phone, base)
    assert requests.get(base + "/conversations", headers={"Authorization": f"Bearer {bearer}"}).status_code == 401
