"""Bearer tokens: short-lived HS256 JWTs signed with SECRET_KEY.

Each token carries the user's token_version; bumping it (password change, sign-out everywhere)
makes every earlier token invalid without a blocklist table.
"""
import time
import uuid

import jwt
from flask import current_app

from ..extensions import db
from ..models import User

ALGORITHM = "HS256"


class TokenError(Exception):
    pass


def issue(user):
    lifetime = current_app.config["TOKEN_EXPIRES_MINUTES"] * 60
    now = int(time.time())
    claims = {"sub": str(user.id), "ver": user.token_version, "iat": now, "exp": now + lifetime,
              "jti": uuid.uuid4().hex}
    return jwt.encode(claims, current_app.config["SECRET_KEY"], algorithm=ALGORITHM), lifetime


def verify(token):
    """The active user the token belongs to, or TokenError saying why not."""
    try:
        claims = jwt.decode(token, current_app.config["SECRET_KEY"], algorithms=[ALGORITHM],
                            options={"require": ["sub", "exp", "iat"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("token has expired") from None
    except jwt.InvalidTokenError:
        raise TokenError("token is invalid") from None
    user = db.session.get(User, int(claims["sub"])) if str(claims["sub"]).isdigit() else None
    if user is None or not user.is_active or claims.get("ver") != user.token_version:
        raise TokenError("token is no longer valid")
    return user
