"""Capacity: the database connection budget, what a request gets when the budget is spent, and
SQLite under gevent.

Connection budget. Each worker process has one pool of DB_POOL_SIZE connections (+ DB_MAX_OVERFLOW,
0 by default: a fixed budget). No request and no generation holds a connection while it waits on the
model or on a client (DESIGN rule 2), so a small pool serves thousands of open streams; what it has to
cover is the requests and background writes *talking to the database at the same moment*. The whole
deployment needs, at most,

    replicas x WEB_CONCURRENCY x (DB_POOL_SIZE + DB_MAX_OVERFLOW + LIMIT_STORE_CONNECTIONS + 1)
    (+ a few for `flask` commands, migrations, psql)

connections (the + 1 is each worker's push listener, webapp/push.py, on PostgreSQL, outside the
pool), which must stay under PostgreSQL's `max_connections` (100 by default, a few of them reserved
for superusers): 2 workers x (10 + 0 + 2 + 1) = 26 per instance, so up to 3 instances on a stock
server (raise max_connections or lower DB_POOL_SIZE for more; or put PgBouncer in front).

A request that cannot get a connection within DB_POOL_TIMEOUT seconds (1 by default) is answered
503 with `Retry-After` (code `busy`), never a 500: the server is full, not broken, and the client
may simply retry.

SQLite under gevent. All greenlets of a worker share one OS thread, and sqlite3 waits for a lock in
C (its busy handler sleeps), which would freeze every stream of the worker; worse, if the greenlet
holding the write lock is the one that must run to release it, the wait can only end in "database is
locked". So SQLite write transactions take the write lock up front (`BEGIN IMMEDIATE`, right before
the first INSERT/UPDATE/DELETE, exactly where sqlite3 would have begun its own transaction) with the
busy timeout at 0, and when the lock is taken they sleep *cooperatively* (time.sleep is gevent's in a
patched worker) and try again, up to SQLITE_LOCK_TIMEOUT seconds. Reads never wait for writers in WAL
mode; the short C-level busy timeout that remains (SQLITE_BUSY_TIMEOUT) only covers the rare moments
when a connection opens or closes the WAL.
"""
import logging
import os
import sqlite3
import sys
import time

from flask import g, has_request_context, request
from sqlalchemy import event
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
BUSY_MESSAGE = "the server is at capacity right now; retry in a moment"
SQLITE_BUSY_TIMEOUT = 1.0      # seconds sqlite3 may wait in C (blocking the worker): opening/closing WAL only
SQLITE_LOCK_TIMEOUT = 30.0     # seconds a writer waits, cooperatively, for the write lock
WRITE_STATEMENTS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
BACKGROUND_POOL_TIMEOUT = 30.0  # seconds: generations, watchdog, sweeper, and streams already answering


# SQLAlchemy names a pool's logger after its class; ours would land in the app's INFO log.
logging.getLogger(f"{__name__}.BudgetPool").setLevel(logging.WARNING)


class BudgetPool(QueuePool):
    """The per-worker pool. Only a request that has not answered yet waits the short DB_POOL_TIMEOUT
    (it can still say 503); background work (saving an answer, heartbeats, the orphan sweep) and a
    stream whose 200 is already sent have nobody to say 503 to, so they wait longer rather than fail
    an answer during a burst. Decided per checkout, in the greenlet or thread that asks."""

    @property
    def _timeout(self):
        if has_request_context() and not g.get("_capacity_answered"):
            return self._request_timeout
        return max(self._request_timeout, BACKGROUND_POOL_TIMEOUT)

    @_timeout.setter
    def _timeout(self, value):
        self._request_timeout = value

    def recreate(self):
        pool = super().recreate()
        pool._timeout = self._request_timeout
        return pool


def engine_options(config):
    """SQLALCHEMY_ENGINE_OPTIONS for the configured database, with the per-worker budget."""
    options = dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    options.setdefault("pool_pre_ping", False)  # webapp/db_ping.py pings only connections idle a while
    options["pool_size"] = config["DB_POOL_SIZE"]
    options["max_overflow"] = config["DB_MAX_OVERFLOW"]
    options["pool_timeout"] = config["DB_POOL_TIMEOUT"]
    options["poolclass"] = BudgetPool
    if config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        connect_args = dict(options.get("connect_args") or {})
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT)
        connect_args.setdefault("check_same_thread", False)  # a connection may serve several greenlets in turn
        options["connect_args"] = connect_args
    return options


def configure_engine(app):
    """Before db.init_app: the pool budget (not for in-memory SQLite, which has one connection)."""
    if app.config["SQLALCHEMY_DATABASE_URI"] in ("sqlite://", "sqlite:///:memory:"):
        return
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(app.config)


def init_app(app):
    """After db.init_app: 503 on pool exhaustion, and SQLite's cooperative write lock."""
    from .extensions import db
    with app.app_context():
        install_sqlite_write_gate(db.engine)

    @app.before_request
    def read_the_body_first():
        """Take the whole (size-limited) body before any view touches the database: a client
        trickling its body must wait on its own, not while holding one of the worker's connections."""
        if request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            request.get_data(cache=True)

    @app.after_request
    def answered(response):
        g._capacity_answered = True  # from here on a streamed body is being sent: too late for a 503
        return response

    @app.errorhandler(PoolTimeout)
    def database_busy(exc):
        log.warning("no database connection within %ss for %s %s: answered 503",
                    app.config["DB_POOL_TIMEOUT"], request.method, request.path)
        return busy_response()


def install_sqlite_write_gate(engine, lock_timeout=SQLITE_LOCK_TIMEOUT):
    """Take SQLite's write lock cooperatively (see the module docstring). Idempotent per engine."""
    if engine.dialect.name != "sqlite" or getattr(engine, "_write_gate", False):
        return
    engine._write_gate = True

    @event.listens_for(engine, "before_cursor_execute")
    def begin_immediate(conn, cursor, statement, parameters, context, executemany):
        dbapi_connection = cursor.connection
        if dbapi_connection.in_transaction or not statement.lstrip()[:7].upper().startswith(WRITE_STATEMENTS):
            return
        take_write_lock(dbapi_connection, lock_timeout)


def take_write_lock(dbapi_connection, timeout):
    """BEGIN IMMEDIATE without ever waiting in C: on "database is locked", sleep (a greenlet switch
    under gevent) and retry, with a growing pause of 1 to 20 ms, until `timeout` seconds have passed."""
    busy_ms = int(SQLITE_BUSY_TIMEOUT * 1000)
    deadline = time.monotonic() + timeout
    pause = 0.001
    dbapi_connection.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout = {busy_ms}")


def busy_response():
    """503 + Retry-After: JSON on the API's paths, a plain page otherwise. The page is built without
    templates on purpose: base.html asks for the signed-in user, which needs the database."""
    from .api.errors import error_response
    from .errors import is_api_request
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS), "Cache-Control": "no-store"}
    if is_api_request():
        return error_response(503, "busy", BUSY_MESSAGE, headers=headers)
    if request.headers.get("HX-Request") == "true":
        return BUSY_MESSAGE.capitalize() + ".", 503, {**headers, "Content-Type": "text/plain; charset=utf-8"}
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Busy</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"></head><body>"
            "<h1>Busy</h1><p>The server is at capacity right now. Nothing was lost; please try again "
            "in a moment.</p><p><a href=\"\">Try again</a></p></body></html>")
    return page, 503, {**headers, "Content-Type": "text/html; charset=utf-8"}


# ---- what a worker reports at start ------------------------------------------------------------------

def cooperative_problems():
    """Reasons this process would block its event loop (empty when fine, or when not under gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return []
    problems = [f"{name} is not monkey-patched" for name in ("select", "threading", "time", "selectors")
                if not monkey.is_module_patched(name)]
    waiting = sys.modules.get("psycopg.waiting")
    if waiting is not None and waiting.wait is getattr(waiting, "wait_c", None):
        problems.append("psycopg was imported before gevent patched select: its waits block the worker")
    return problems


def describe_worker():
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return f"worker {os.getpid()}: not under gevent (threads)"
    problems = cooperative_problems()
    if problems:
        message = f"worker {os.getpid()}: gevent, BUT " + "; ".join(problems)
        log.error(message)
        return message
    waiting = sys.modules.get("psycopg.waiting")
    wait = waiting.wait.__name__ if waiting is not None else "not loaded"
    return f"worker {os.getpid()}: gevent, cooperative waits (psycopg {wait})"
