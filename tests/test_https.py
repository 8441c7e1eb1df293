"""webapp/https.py: cookies are Secure whenever the request came over HTTPS, directly or through a
trusted proxy; a forged X-Forwarded-Proto from anyone else changes nothing."""
import re

from helpers import PASSWORD, make_user


def _cookies_after_page_sign_in(client, base_url="http://localhost", **headers):
    html = client.get("/login", base_url=base_url, headers=headers).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    response = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token,
                                           "remember": "1"}, headers=headers, base_url=base_url)
    assert response.status_code == 302
    cookies = response.headers.getlist("Set-Cookie")
    assert {c.split("=")[0] for c in cookies} >= {"session", "remember_token"}
    return cookies


def _secure(cookie):
    return "secure" in {part.strip().lower() for part in cookie.split(";")[1:]}


def test_cookies_are_secure_over_https_and_not_over_http(app, user):
    for cookie in _cookies_after_page_sign_in(app.test_client()):
        assert not _secure(cookie)
    # Over HTTPS, Flask-WTF also wants a same-origin Referer, as browsers send.
    for cookie in _cookies_after_page_sign_in(app.test_client(), "https://localhost",
                                              Referer="https://localhost/login"):
        assert _secure(cookie) and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_forwarded_https_counts_only_from_a_trusted_proxy(make_app):
    behind_proxy = make_app(TRUSTED_PROXIES=1, TRUSTED_PROXY_NETWORKS="127.0.0.1/32")
    make_user(behind_proxy)
    forwarded = {"X-Forwarded-Proto": "https", "Referer": "https://localhost/login"}
    for cookie in _cookies_after_page_sign_in(behind_proxy.test_client(), **forwarded):
        assert _secure(cookie)
    direct = make_app()
    for cookie in _cookies_after_page_sign_in(direct.test_client(), **forwarded):
        assert not _secure(cookie)
