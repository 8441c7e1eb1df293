"""Readiness: the database answers and its schema is at the newest migration. The LLM's state is
reported beside it but never makes the app unready (history and sign-in work while Ollama is down
or pulling a model)."""
from functools import lru_cache

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text

from .config import ROOT
from .extensions import db


@lru_cache(maxsize=1)
def head_revision():
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def database_state():
    """(ready, what) — what says in words which part is missing."""
    try:
        current = db.session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:  # unreachable, or never migrated
        db.session.rollback()
        return False, "database unreachable or not migrated"
    finally:
        db.session.rollback()  # release the connection at once
    if current != head_revision():
        return False, f"migrations not at head (database {current}, code {head_revision()})"
    return True, "ok"
