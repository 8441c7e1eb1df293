"""The token endpoint as OAuth2 libraries nobody here wrote see it (RFC 6749 §4.3 and §5), against
gunicorn over real HTTP: requests-oauthlib's LegacyApplicationClient and Authlib's OAuth2Session get
a token with the right password and raise their own specific errors for each failure, and the token
they get works on the API."""
import pytest
import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session as AuthlibSession
from oauthlib.oauth2 import BackendApplicationClient, LegacyApplicationClient
from oauthlib.oauth2.rfc6749 import errors as oauthlib_errors
from requests_oauthlib import OAuth2Session

from helpers import PASSWORD, both_databases, make_user
from live import LiveServer

pytestmark = both_databases


@pytest.fixture
def server(app, ollama, database_url, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # plain HTTP on loopback, for the test only
    make_user(app)
    make_user(app, "bob")
    live = LiveServer(database_url, ollama.url, LOGIN_LIMIT_PER_USER="3 per minute",
                      LOGIN_LIMIT_PER_ADDRESS="").start()
    live.token_url = live.url + "/auth/login"
    yield live
    live.stop()


def conversations(server, token):
    return requests.get(server.url + "/conversations", timeout=10,
                        headers={"Authorization": f"Bearer {token['access_token']}"})


def test_requests_oauthlib_gets_a_token_and_raises_specific_errors(server):
    session = OAuth2Session(client=LegacyApplicationClient(client_id="any-client"))
    token = session.fetch_token(server.token_url, username="alice", password=PASSWORD)
    assert token["token_type"] == "bearer" and token["expires_in"] == 3600
    assert conversations(server, token).status_code == 200
    # The session itself sends the token as a bearer header.
    assert session.get(server.url + "/conversations", timeout=10).json()["conversations"] == []

    with pytest.raises(oauthlib_errors.InvalidGrantError) as wrong:
        OAuth2Session(client=LegacyApplicationClient(client_id="x")).fetch_token(
            server.token_url, username="bob", password="not the password")
    assert wrong.value.status_code == 400 and wrong.value.description == "incorrect username or password"
    with pytest.raises(oauthlib_errors.InvalidGrantError):
        OAuth2Session(client=LegacyApplicationClient(client_id="x")).fetch_token(
            server.token_url, username="nobody-by-this-name", password="not the password")
    # oauthlib leaves an empty password out of the form: a missing parameter is invalid_request
    # (which oauthlib raises as the first of its classes with that code, InvalidClientIdError).
    with pytest.raises(oauthlib_errors.OAuth2Error) as missing:
        OAuth2Session(client=LegacyApplicationClient(client_id="x")).fetch_token(
            server.token_url, username="bob", password="")
    assert missing.value.error == "invalid_request" and "password" in missing.value.description
    # Another grant (client credentials) is not offered.
    with pytest.raises(oauthlib_errors.UnsupportedGrantTypeError):
        OAuth2Session(client=BackendApplicationClient(client_id="x")).fetch_token(
            server.token_url, client_secret="s")


def test_authlib_gets_a_token_and_raises_specific_errors(server):
    with AuthlibSession() as session:
        token = session.fetch_token(server.token_url, username="alice", password=PASSWORD)
        assert token["token_type"] == "bearer" and token["access_token"]
        assert session.get(server.url + "/conversations", timeout=10).status_code == 200
    assert conversations(server, token).status_code == 200

    with AuthlibSession() as session:
        with pytest.raises(OAuthError) as wrong:
            session.fetch_token(server.token_url, username="bob", password="not the password")
    assert wrong.value.error == "invalid_grant"
    assert wrong.value.description == "incorrect username or password"
    with AuthlibSession() as session:
        with pytest.raises(OAuthError) as other_grant:
            session.fetch_token(server.token_url, grant_type="client_credentials")
    assert other_grant.value.error == "unsupported_grant_type"


def test_throttled_sign_ins_reach_both_libraries_as_a_named_error(server):
    """Failed sign-ins still count although they are now 400s: the fourth try within the minute is
    refused (even with the right password) with a string `error` both libraries surface."""
    for _ in range(3):
        with pytest.raises(oauthlib_errors.InvalidGrantError):
            OAuth2Session(client=LegacyApplicationClient(client_id="x")).fetch_token(
                server.token_url, username="bob", password="guess")
    with pytest.raises(oauthlib_errors.OAuth2Error) as throttled:
        OAuth2Session(client=LegacyApplicationClient(client_id="x")).fetch_token(
            server.token_url, username="bob", password=PASSWORD)
    assert throttled.value.error == "too_many_attempts"  # oauthlib has no class for it: CustomOAuth2Error
    with AuthlibSession() as session:
        with pytest.raises(OAuthError) as again:
            session.fetch_token(server.token_url, username="bob", password=PASSWORD)
    assert again.value.error == "too_many_attempts" and "try again in" in again.value.description
    raw = requests.post(server.token_url, data={"username": "bob", "password": PASSWORD}, timeout=10)
    assert raw.status_code == 429 and 1 <= int(raw.headers["Retry-After"]) <= 61
    # alice is another account: bob's failures do not lock her out.
    with AuthlibSession() as session:
        assert session.fetch_token(server.token_url, username="alice", password=PASSWORD)["access_token"]
