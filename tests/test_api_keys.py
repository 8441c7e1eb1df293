"""Personal API keys: made on the settings page and through the API, shown once, stored hashed,
usable as a bearer credential on every API route (never as a browser session), refused at once when
revoked, expired or their owner disabled; they survive a password change and signing out everywhere."""
import hashlib
import re
from datetime import timedelta

from helpers import both_databases, csrf_of, login_token

pytestmark = both_databases


def make_key(client, auth, name="script", **extra):
    response = client.post("/auth/keys", json={"name": name, **extra}, headers=auth)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.headers["Cache-Control"] == "no-store"
    return response.get_json()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_made_shown_once_stored_hashed_and_works_on_every_api_route(app, client, auth):
    made = make_key(client, auth, "laptop")
    key = made["key"]
    assert re.fullmatch(r"llmk_[A-Za-z0-9_-]{43}", key)
    assert made["prefix"] == key[:12] and made["name"] == "laptop" and made["expires_at"] is None
    listed = client.get("/auth/keys", headers=auth).get_json()["keys"]
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import ApiKey
        row = db.session.get(ApiKey, made["id"])
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key not in (row.prefix, row.key_hash, row.name)
    assert client.get("/conversations", headers=bearer(key)).status_code == 200
    assert client.get("/models", headers=bearer(key)).status_code == 200
    assert client.post("/chat/", json={"prompt": "hi"}, headers=bearer(key)).status_code == 200
    assert client.get("/auth/keys", headers=bearer(key)).get_json()["keys"][0]["last_used_at"] is not None


def test_last_used_is_written_at_most_once_a_minute(app, client, auth):
    key = make_key(client, auth)["key"]
    client.get("/conversations", headers=bearer(key))
    first = client.get("/auth/keys", headers=auth).get_json()["keys"][0]["last_used_at"]
    client.get("/conversations", headers=bearer(key))
    assert client.get("/auth/keys", headers=auth).get_json()["keys"][0]["last_used_at"] == first


def test_revoked_expired_and_disabled_keys_are_refused_at_once(app, client, auth):
    revoked, expiring, kept = (make_key(client, auth, name) for name in ("a", "b", "c"))
    assert client.delete(f"/auth/keys/{revoked['id']}", headers=auth).status_code == 204
    assert client.delete(f"/auth/keys/{revoked['id']}", headers=auth).status_code == 404
    response = client.get("/conversations", headers=bearer(revoked["key"]))
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert "revoked" in response.get_json()["error"]["message"]
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import ApiKey, User, utcnow
        db.session.get(ApiKey, expiring["id"]).expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
    assert client.get("/conversations", headers=bearer(expiring["key"])).status_code == 401
    assert client.get("/conversations", headers=bearer(kept["key"])).status_code == 200
    with app.app_context():
        db.session.get(User, 1).is_active = False
        db.session.commit()
    assert client.get("/conversations", headers=bearer(kept["key"])).status_code == 401
    assert client.get("/conversations", headers=bearer("llmk_" + "x" * 43)).status_code == 401


def test_keys_survive_a_password_change_and_signing_out_everywhere(app, client, auth):
    key = make_key(client, auth)["key"]
    assert client.post("/auth/logout-all", headers=auth).status_code == 204
    assert client.get("/conversations", headers=auth).status_code == 401  # the JWT died
    assert client.get("/conversations", headers=bearer(key)).status_code == 200  # the key did not
    with app.app_context():
        from webapp.auth.accounts import set_password
        from webapp.extensions import db
        from webapp.models import User
        set_password(db.session.get(User, 1), "another good passphrase")
    assert client.get("/conversations", headers=bearer(key)).status_code == 200


def test_someone_elses_key_id_is_not_found_and_names_are_checked(app, client, auth):
    from helpers import make_user
    mine = make_key(client, auth)
    make_user(app, "bob")
    bob = {"Authorization": f"Bearer {login_token(client, 'bob')}"}
    assert client.delete(f"/auth/keys/{mine['id']}", headers=bob).status_code == 404
    assert client.get("/auth/keys", headers=bob).get_json() == {"keys": []}
    assert client.get("/conversations", headers=bearer(mine["key"])).status_code == 200
    for body, field in (({"name": " "}, "name"), ({}, "name"), ({"name": "x" * 101}, "name"),
                        ({"name": "x", "expires_in_days": 0}, "expires_in_days"),
                        ({"name": "x", "expires_in_days": True}, "expires_in_days")):
        response = client.post("/auth/keys", json=body, headers=auth)
        assert response.status_code == 422 and response.get_json()["error"]["field"] == field, body
    dated = make_key(client, auth, "dated", expires_in_days=30)
    assert dated["expires_at"] is not None
    assert client.post("/auth/keys", json={"name": "x"}).status_code == 401


def test_a_key_is_never_a_browser_session(client, auth):
    key = make_key(client, auth)["key"]
    response = client.get("/settings", headers=bearer(key))
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    client.set_cookie("session", key)
    assert client.get("/settings").status_code == 302


def test_the_settings_page_makes_lists_and_revokes_keys(browser):
    token = csrf_of(browser, "/settings")
    made = browser.post("/settings/keys", data={"name": "cron job", "expires_in_days": "30", "csrf_token": token})
    html = made.get_data(as_text=True)
    assert made.status_code == 200 and made.headers["Cache-Control"] == "no-store"
    key = re.search(r'<code id="new-key" class="secret">(llmk_[^<]+)</code>', html).group(1)
    assert browser.get("/conversations", headers=bearer(key)).status_code == 200
    page = browser.get("/settings").get_data(as_text=True)
    assert "cron job" in page and key[:12] in page and key not in page  # shown once, never again
    key_id = re.search(r'/settings/keys/(\d+)/revoke', page).group(1)
    revoked = browser.post(f"/settings/keys/{key_id}/revoke", data={"csrf_token": token})
    assert revoked.status_code == 302
    assert browser.get("/conversations", headers=bearer(key)).status_code == 401
    assert "You have no API keys" in browser.get("/settings").get_data(as_text=True)
    refused = browser.post("/settings/keys", data={"name": "  ", "csrf_token": token})
    assert refused.status_code == 422 and 'id="key-error"' in refused.get_data(as_text=True)
    assert browser.post("/settings/keys", data={"name": "no csrf"}).status_code in (400, 403)


def test_a_program_holding_a_key_can_manage_keys(client, auth):
    key = make_key(client, auth)["key"]
    child = client.post("/auth/keys", json={"name": "child"}, headers=bearer(key))
    assert child.status_code == 201
    assert len(client.get("/auth/keys", headers=bearer(key)).get_json()["keys"]) == 2


def test_a_key_can_be_revoked_by_its_value_for_rfc7009(app, client, auth):
    key = make_key(client, auth)["key"]
    with app.app_context():
        from webapp.auth import api_keys
        assert not api_keys.revoke_by_value(key, user_id=2)  # not bob's
        assert api_keys.revoke_by_value(key, user_id=1)
        assert not api_keys.revoke_by_value(key)  # already ended
    assert client.get("/conversations", headers=bearer(key)).status_code == 401
