"""Bearer tokens: short-lived HS256 JWTs signed with SECRET_KEY.

Each token carries the user's token_version; bumping it (password change, sign-out everywhere)
makes every earlier token of the account invalid at once. One token alone is revoked (RFC 7009,
POST /auth/revoke) by its `jti` in revoked_tokens, kept only until the token's own expiry; the
check rides on the query that loads the token's user, so it costs no extra round trip.
"""
import functools
import time
import uuid
from datetime import UTC, datetime

import jwt
from flask import current_app, g
from sqlalchemy import and_, bindparam, delete, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from ..extensions import db, execute_read
from ..limits import MAX_ID
from ..models import RevokedToken, User, detached, utcnow

ALGORITHM = "HS256"
JTI_MAX = 64  # the column's width; ours are 32 hex characters


class TokenError(Exception):
    pass


def issue(user):
    lifetime = current_app.config["TOKEN_EXPIRES_MINUTES"] * 60
    now = int(time.time())
    claims = {"sub": str(user.id), "ver": user.token_version, "iat": now, "exp": now + lifetime,
              "jti": uuid.uuid4().hex}
    return jwt.encode(claims, current_app.config["SECRET_KEY"], algorithm=ALGORITHM), lifetime


def claims_of(token):
    """The claims of a token this app signed and that has not expired, or TokenError saying why not."""
    try:
        claims = _decoded(token, current_app.config["SECRET_KEY"])
    except jwt.ExpiredSignatureError:
        raise TokenError("token has expired") from None
    except jwt.InvalidTokenError:
        raise TokenError("token is invalid") from None
    if int(claims["exp"]) <= time.time():  # checked on every use: the decoding below may be remembered
        raise TokenError("token has expired")
    jti = claims.get("jti")  # every token we sign has one (checked after expiry, which says more)
    sub = str(claims["sub"])
    # A user id bigger than an INTEGER column holds would make PostgreSQL fail, not say "invalid".
    if not (sub.isdigit() and int(sub) <= MAX_ID and isinstance(jti, str) and 0 < len(jti) <= JTI_MAX):
        raise TokenError("token is invalid")
    return claims


@functools.lru_cache(maxsize=4096)
def _decoded(token, secret):
    """The claims of a token whose signature and claims PyJWT accepted (at the time: the caller checks
    the expiry on every use). A client sends the same token on every request: its HMAC and JSON were
    ~0.2 ms of each (3 % of the app's CPU in a burst of streams). Only tokens signed with `secret` get here (a
    failure raises and is not remembered), so nobody can fill this with tokens of their own making.
    The dict is shared by every use: read it, never change it."""
    return jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp", "iat"]})


def verify(token):
    """The active user the token belongs to (its jti goes to g.auth_jti: what an open stream re-checks), or
    TokenError saying why not. One Core query: the user's row, left-joined with the token's denylist row.
    Every request with a bearer token runs it, so it skips the ORM's load (identity map, instance
    state): the User returned is a plain copy of the row, not tracked by the session; a view that
    changes the account loads it (db.session.get) and writes that."""
    return Unchecked(claims_of(token)).check_now()


class Unchecked:
    """A bearer token whose signature and expiry were checked here, and whose row is still to be
    checked (the account active, the token's version, not revoked): by `check_now()` (verify), or by
    `accept(values)` with the row as a statement that starts a turn read it (service.turns folds the
    check into that statement: one round trip fewer). `on_accept(user)` is called with the user once
    the row passed; `user` is set then."""

    def __init__(self, claims, on_accept=None):
        self.claims = claims
        self.id = int(claims["sub"])
        self.user = None
        self._on_accept = on_accept

    def check_now(self):
        # Alone (PostgreSQL): no BEGIN before it. A turn that starts a conversation then needs no
        # transaction of its own either (answers.open_in_new_conversation).
        rows = execute_read(_VERIFY, {"b_user_id": self.id, "b_jti": self.claims["jti"]})
        return self.accept(rows[0]._asdict() if rows else None)

    def accept(self, values):
        """The user of `values` (the row _VERIFY reads, as a dict; None or an id of None: no such
        user), or TokenError saying why the token may not be used."""
        if values is None or values["id"] is None:
            raise TokenError("token is no longer valid")
        values = dict(values)
        if values.pop("revoked_jti") is not None:
            raise TokenError("token was revoked")
        if not values["is_active"] or self.claims.get("ver") != values["token_version"]:
            raise TokenError("token is no longer valid")
        g.auth_jti = self.claims["jti"]  # what an open stream re-checks (webapp/stream_auth.py)
        self.user = detached(User, **values)
        if self._on_accept is not None:
            self._on_accept(self.user)
        return self.user


_USERS, _REVOKED = User.__table__, RevokedToken.__table__


def _row_of(user_id, jti):
    """The token's user's row, left-joined with the token's denylist row (revoked_jti)."""
    return (select(_USERS, _REVOKED.c.jti.label("revoked_jti"))
            .outerjoin(_REVOKED, and_(_REVOKED.c.jti == jti, _REVOKED.c.user_id == _USERS.c.id))
            .where(_USERS.c.id == user_id))


_VERIFY = _row_of(bindparam("b_user_id"), bindparam("b_jti"))
VERIFIED_COLUMNS = tuple(_VERIFY.selected_columns.keys())


def row_check():
    """_VERIFY as a CTE, for a statement that folds the token's check in (parameters t_user_id, t_jti)."""
    return _row_of(bindparam("t_user_id"), bindparam("t_jti")).cte("token_row")


def revoke(token):
    """RFC 7009 for one access token: deny its jti until it expires. True if the token was one of ours,
    unexpired, and now is (or already was) revoked; False for anything else (nothing to do)."""
    try:
        claims = claims_of(token)
    except TokenError:
        return False
    now = utcnow()
    # Ended rows are useless once their token would have expired: purge them here (indexed, and
    # revocations are rare), so the table holds at most one token lifetime of revocations.
    db.session.execute(delete(RevokedToken).where(RevokedToken.expires_at < now))
    expires_at = datetime.fromtimestamp(int(claims["exp"]), UTC)
    # Only for an existing user (a deleted account's token has nothing to deny, and the FK would refuse).
    rows = select(literal(claims["jti"]), User.id, literal(expires_at, RevokedToken.expires_at.type)).where(
        User.id == int(claims["sub"]))
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    db.session.execute(dialect.insert(RevokedToken).from_select(["jti", "user_id", "expires_at"], rows)
                       .on_conflict_do_nothing())
    db.session.commit()
    return True
