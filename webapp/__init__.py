"""llm_api_assistant: a chat app in front of a local LLM server, with a browser UI and a JSON API."""
import logging
import secrets
import sys

from flask import Flask, make_response, request
from sqlalchemy import event
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException

from . import capacity, cors, db_ping, devkey, errors, https
from . import config as config_module
from .auth import throttle
from .extensions import csrf, db, htmx, llm_service, login_manager, migrate
from .generation import generations
from .logs import init_request_ids, setup_logging

# URLs that belong to the JSON API even when they match no route (404/405 at routing): kept here,
# next to the blueprint registrations, so a new API route's prefix is added where it is mounted.
API_PREFIXES = ("/auth/", "/chat", "/conversations", "/models", "/health", "/ready", "/openapi.json", "/v1")
OPENAI_PREFIX = "/v1"  # the OpenAI-compatible door (webapp/api/v1.py): OpenAI's error shape, even unmatched


class ConfigError(RuntimeError):
    pass


def create_app(overrides=None):
    """The app factory (`flask` finds it; gunicorn runs 'webapp:create_app()')."""
    app = Flask(__name__, instance_path=str(config_module.INSTANCE_DIR),
                template_folder=str(config_module.ROOT / "templates"),
                static_folder=str(config_module.ROOT / "static"))
    app.config.update(config_module.load_config())
    app.config.update(overrides or {})
    setup_logging(app.config["LOG_LEVEL"])
    _check_secret_key(app)
    _prepare_database(app)

    db.init_app(app)
    capacity.init_app(app)
    with app.app_context():
        db_ping.install(db.engine)
    migrate.init_app(app, db, directory=str(config_module.ROOT / "migrations"))
    login_manager.init_app(app)
    csrf.init_app(app)
    htmx.init_app(app)
    throttle.init_throttle(app)
    llm_service.init_app(app)
    generations.init_app(app)
    init_request_ids(app)
    cors.init_app(app, API_PREFIXES)  # after the request ids, so a preflight's answer has one too

    from . import models  # noqa: F401  (register the tables with SQLAlchemy)
    from .api import bp as api_bp
    csrf.exempt(api_bp)  # bearer tokens, not cookies: no CSRF exposure
    app.register_blueprint(api_bp)
    from .api.v1 import bp as v1_bp
    csrf.exempt(v1_bp)  # bearer tokens and API keys, not cookies
    app.register_blueprint(v1_bp)
    from .web import init_web
    init_web(app)
    errors.init_app(app, API_PREFIXES)
    from .docs import bp as docs_bp
    app.register_blueprint(docs_bp)
    from .cli import register_cli
    register_cli(app)
    _register_error_handlers(app)
    https.wrap(app)
    from .auth.setup import announce
    announce(app)
    return app


def _check_secret_key(app):
    """Production refuses a missing or weak key. Without one, a debug server uses a random key made
    for this server start (webapp/devkey.py), never a published one; tests a random one per app."""
    if app.config.get("DEBUG") or app.config.get("TESTING"):
        if not app.config.get("SECRET_KEY"):
            if app.config.get("DEBUG"):
                app.config["SECRET_KEY"] = devkey.development_key(config_module.INSTANCE_DIR)
            else:
                app.config["SECRET_KEY"] = secrets.token_hex(32)
        return
    problem = config_module.secret_key_problem(app.config)
    if problem:
        message = (f"refusing to start: {problem}; set a random one, e.g. "
                   "SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')")
        print(message, file=sys.stderr)
        raise ConfigError(message)


def _prepare_database(app):
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite:///"):
        config_module.INSTANCE_DIR.mkdir(parents=True, exist_ok=True)
    capacity.configure_engine(app)  # the per-worker connection budget; SQLite's waits off the event loop
@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, record):
    """WAL lets readers (stream followers) work while a generation thread writes."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()
        # SQLite's lower() folds ASCII only: the search folds other alphabets (Привет) with this.
        dbapi_connection.create_function("unicode_lower", 1, _unicode_lower, deterministic=True)


def _unicode_lower(value):
    return value.lower() if isinstance(value, str) else value


def _register_error_handlers(app):
    """What no blueprint handled: HTTP errors (also for URLs matching no route), the sign-in limits,
    and the unexpected. Each door's renderer draws it (webapp/errors.py picks the door)."""
    from .api import errors as api_errors
    from .web import errors as web_errors

    @app.errorhandler(throttle.Throttled)
    def throttled(exc):
        # Sign-in, sign-up and password checks are limited; the wait is the same on both doors.
        from .auth.views import throttled_page
        if errors.is_api_request():
            return api_errors.too_many_sign_ins(exc.retry_after)
        return throttled_page(exc.retry_after)

    from .api import v1

    def is_openai_path():
        return request.path == OPENAI_PREFIX or request.path.startswith(OPENAI_PREFIX + "/")

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if is_openai_path():
            return v1.http_error_response(exc)
        if errors.is_api_request():
            return api_errors.http_error(exc)
        return errors.with_http_headers(make_response(web_errors.http_error_page(exc)), exc)

    @app.errorhandler(Exception)
    def unexpected(exc):
        logging.getLogger("webapp").exception("unhandled error on %s %s", request.method, request.path)
        db.session.rollback()
        if is_openai_path():
            return v1.internal_error()
        return api_errors.internal_error() if errors.is_api_request() else web_errors.internal_error_page()
