"""What the benchmarks share: a fresh, migrated database and a user to own the data."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef")

from flask_migrate import upgrade  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import User  # noqa: E402


def fresh_app(url):
    """The app on `url`, migrated; a SQLite file is started from scratch."""
    if url.startswith("sqlite:////") and os.path.exists(url[10:]):
        os.remove(url[10:])
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        upgrade()
    return app


def bench_user():
    user = User(username=f"bench{int(time.time())}", password_hash="x")
    db.session.add(user)
    db.session.commit()
    return user
