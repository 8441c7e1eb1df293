"""The first administrator, without a race.

Being the first to sign up used to make you admin, so on a fresh deployment with sign-up open the
first stranger to find it won (and 12 simultaneous sign-ups made 12 admins). Now an admin comes from
- `flask create-user NAME --admin` at the shell, or
- the sign-up page with the one-time setup token, which each worker writes to the log at start while
  no admin exists. The token is an HMAC of SECRET_KEY, so every worker and replica prints the same
  one without storing it anywhere; it is good once: using it inserts the row 'first-admin' into
  setup_claims, whose primary key lets exactly one of any number of simultaneous sign-ups in (the
  others get an error and no account). Anyone who knows SECRET_KEY can forge sessions anyway, so
  deriving the token from it gives nothing away.
"""
import hashlib
import hmac
import logging

from flask import current_app
from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ..extensions import db
from ..models import SetupClaim, User

FIRST_ADMIN = "first-admin"
log = logging.getLogger("webapp.setup")


def setup_token(secret_key=None):
    key = (secret_key or current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, b"llm_api_assistant first admin setup", hashlib.sha256).hexdigest()[:24]


def admin_needed():
    """True while no admin exists and the setup token has not been used."""
    return not db.session.scalar(select(exists().where(User.is_admin.is_(True))
                                        | exists().where(SetupClaim.name == FIRST_ADMIN)))


def claim_first_admin(user, token):
    """Make `user` (added, not yet committed) the first admin, or raise AccountError."""
    from .accounts import AccountError
    if not hmac.compare_digest(str(token).strip(), setup_token()):
        raise AccountError("the setup token is not right (it is in the server's log)")
    user.is_admin = True
    try:
        db.session.flush()
        db.session.add(SetupClaim(name=FIRST_ADMIN, user_id=user.id))
        db.session.flush()  # on PostgreSQL a rival's insert waits here for ours to commit, then fails
    except IntegrityError:
        raise AccountError("the setup token has already been used") from None


def announce(app):
    """At start: while there is no admin, write the setup token to the log (once per worker)."""
    if app.config.get("TESTING") or not app.config.get("ALLOW_SIGNUP"):
        return
    try:
        with app.app_context():
            try:
                needed = admin_needed()
            finally:
                db.session.remove()
                db.engine.dispose()  # no connection kept from start-up (safe with gunicorn --preload)
    except SQLAlchemyError:
        return  # no tables yet (`flask db upgrade` itself starts the app)
    if needed:
        with app.app_context():
            token = setup_token()
        log.warning("No administrator yet. To become the first one, sign up at /register with the setup "
                    "token %s (good once), or run: flask create-user NAME --admin", token)
