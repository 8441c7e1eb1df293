"""Account rules shared by the CLI, the API and the pages."""
from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..extensions import db
from ..models import User
from . import hashing, sessions

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


def create_user(username, password, is_admin=False, setup_token=None):
    """Create an account. Admins come from `flask create-user --admin`, or from the sign-up page with
    the one-time setup token (see setup.py): never from being first, which is a race anyone can win.

    The password is hashed before any query, so no database connection waits on the hash."""
    name = check_username(username)
    check_password(password)
    password_hash = hashing.generate(password)
    if find_user(name) is not None:
        raise AccountError(f"user '{name}' already exists")
    user = User(username=name, is_admin=bool(is_admin), password_hash=password_hash)
    db.session.add(user)
    if setup_token:
        from . import setup
        try:
            setup.claim_first_admin(user, setup_token)  # flushes; raises AccountError if taken or wrong
        except AccountError:
            db.session.rollback()
            raise
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise AccountError(f"user '{name}' already exists") from None
    return user


def authenticate(username, password):
    """The user for these credentials, or None. Takes the same time whether or not the user exists.

    The database connection is given back before the hash: a burst of sign-ins queues on the
    password pool (hashing.py) without holding connections every other request needs."""
    user = find_user(username) if isinstance(username, str) else None
    user_id, password_hash = (user.id, user.password_hash) if user is not None else (None, None)
    db.session.close()  # gives the connection back; loaded objects keep their values
    # Hash anyway for unknown users so timing does not tell which usernames exist.
    matches = hashing.check(password_hash or hashing.dummy_hash(), password if isinstance(password, str) else "")
    if user_id is None or not matches:
        return None
    user = db.session.get(User, user_id)  # fresh: active and token_version as of now
    if user is None or not user.is_active:
        return None
    return user


def check_current_password(user, password):
    """The settings page's check, with the connection released during the hash; returns the user
    re-loaded (the object passed in is detached by then) when the password is right, else None."""
    user_id, password_hash = user.id, user.password_hash
    db.session.close()  # gives the connection back; loaded objects keep their values
    if not hashing.check(password_hash, password if isinstance(password, str) else ""):
        return None
    return db.session.get(User, user_id)


def set_password(user, password, keep_session=None):
    """Change the password and end every other session and every token of this user."""
    check_password(password)
    user_id = user.id
    db.session.close()  # gives the connection back; loaded objects keep their values
    password_hash = hashing.generate(password)
    user = db.session.get(User, user_id)
    user.password_hash = password_hash
    user.token_version += 1
    sessions.revoke_all(user.id, keep=keep_session)
    db.session.commit()
    return user


def revoke_all(user):
    """End every session and bearer token of this user at once (a leaked token, a lost laptop)."""
    user = db.session.get(User, user.id)  # the session's own row (a bearer token's user is a copy: tokens.verify)
    user.token_version += 1
    sessions.revoke_all(user.id)
    db.session.commit()


def set_active(user, active):
    """Disable (or enable again) an account. Disabling ends every session, bearer token and open
    stream of it at once (streams within a few seconds: webapp/stream_auth.py); API keys die with it
    because every credential checks is_active."""
    user.is_active = bool(active)
    if not active:
        user.token_version += 1
        sessions.revoke_all(user.id)
    db.session.commit()
    return user
