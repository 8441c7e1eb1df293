"""Account rules shared by the CLI, the API and the pages."""
from flask import current_app
from sqlalchemy import func, select

from ..extensions import db
from ..models import User

USERNAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-@")


class AccountError(ValueError):
    pass


def check_username(username):
    name = User.normalize(username)
    if not 2 <= len(name) <= 64 or not set(name) <= USERNAME_CHARS:
        raise AccountError("username must be 2-64 characters: letters, digits, '.', '_', '-' or '@'")
    return name


def check_password(password):
    minimum = current_app.config["MIN_PASSWORD_LENGTH"]
    if not isinstance(password, str) or len(password) < minimum:
        raise AccountError(f"password must be at least {minimum} characters long")
    if len(password) > 1024:
        raise AccountError("password must be at most 1024 characters long")
    return password


def find_user(username):
    return db.session.scalar(select(User).where(User.username == User.normalize(username)))


def user_for_session(session_id):
    """The active user a session id ('user_id:token_version') names, or None: a bumped version
    (password change, sign-out everywhere) ends old sessions."""
    user_id, _, version = (session_id or "").partition(":")
    if not (user_id.isascii() and user_id.isdigit() and version.isascii() and version.isdigit()):
        return None
    user = db.session.get(User, int(user_id))
    if user is None or not user.is_active or user.token_version != int(version):
        return None
    return user


def create_user(username, password, is_admin=False):
    """Create an account; the very first account ever created becomes an admin."""
    name = check_username(username)
    check_password(password)
    if find_user(name) is not None:
        raise AccountError(f"user '{name}' already exists")
    first = db.session.scalar(select(func.count(User.id))) == 0
    user = User(username=name, is_admin=is_admin or first)
    user.set_password(password)
    db.session.add(user)
    db.session.commit()
    return user


def authenticate(username, password):
    """The user for these credentials, or None. Takes the same time whether or not the user exists."""
    user = find_user(username) if isinstance(username, str) else None
    if user is None:
        # Hash anyway so timing does not tell which usernames exist.
        User(password_hash=_dummy_hash()).check_password(password if isinstance(password, str) else "")
        return None
    if not user.check_password(password if isinstance(password, str) else "") or not user.is_active:
        return None
    return user


def set_password(user, password):
    """Change the password and end every other session and token of this user."""
    check_password(password)
    user.set_password(password)
    user.token_version += 1
    db.session.commit()


def revoke_all(user):
    """End every session and bearer token of this user at once (a leaked token, a lost laptop)."""
    user.token_version += 1
    db.session.commit()


_DUMMY = {}


def _dummy_hash():
    if "hash" not in _DUMMY:
        from werkzeug.security import generate_password_hash
        _DUMMY["hash"] = generate_password_hash("not-a-real-password")
    return _DUMMY["hash"]
