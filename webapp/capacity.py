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

Admission. A request's first checkout passes a per-worker gate (`Gate`): at most `slots` requests
(the pool minus a reserve for background work: saving answers, flushes, heartbeats) hold a
connection at once, and the rest wait in a queue *holding nothing* (no connection, no CPU: a parked
greenlet), served round-robin across clients (bearer credential, else session cookie, else address)
and first come first served within one. A burst of stream starts therefore queues where it costs
nothing, and the few holders are not slowed by hundreds of greenlets contending for connections on
the same event loop (which used to stretch each hold past the wait and answer most of a burst 503).
A request waits at most DB_POOL_TIMEOUT seconds (30 by default) in the queue; the queue holds at most
DB_QUEUE_MAX requests per worker (1000): when full, a newcomer takes the place of the newest waiter
of the client with the most waiters if that client has more than the newcomer's, else it is refused
at once, so one client's flood cannot shut others out. A refused or timed-out request is answered
503 with `Retry-After` (code `busy`), never a 500: the server is full, not broken, and the client may
simply retry. What bounds the time a connection is *held* is that every transaction is short and no
request waits on the model or a client while holding one (DESIGN rule 2); once admitted, a request's
later checkouts (e.g. reading the final answer) and background work bypass the queue.

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
import threading
import time
from collections import OrderedDict, deque

from flask import g, has_request_context, request
from sqlalchemy import event
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from .wsgi_body import after_body

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
BUSY_MESSAGE = "the server is at capacity right now; retry in a moment"
SQLITE_BUSY_TIMEOUT = 1.0      # seconds sqlite3 may wait in C (blocking the worker): opening/closing WAL only
SQLITE_LOCK_TIMEOUT = 30.0     # seconds a writer waits, cooperatively, for the write lock
WRITE_STATEMENTS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
BACKGROUND_POOL_TIMEOUT = 30.0  # seconds: generations, watchdog, sweeper, and streams already answering


# SQLAlchemy names a pool's logger after its class; ours would land in the app's INFO log.
logging.getLogger(f"{__name__}.BudgetPool").setLevel(logging.WARNING)


class Busy(PoolTimeout):
    """No connection for this request: the admission queue is full, or its wait ran out (-> 503)."""


class _Waiter:
    __slots__ = ("event", "granted", "refused")

    def __init__(self):
        self.event = threading.Event()  # gevent's under a patched worker: a parked greenlet
        self.granted = self.refused = False


class Gate:
    """Admission in front of the pool: `slots` permits, handed over directly (no barging) to waiters
    in round-robin order across keys, FIFO within a key; at most `max_waiting` waiters."""

    def __init__(self, slots, max_waiting):
        self.slots, self.max_waiting = slots, max_waiting
        self.free = slots
        self.waiting = 0
        self.peak_waiting = 0
        self._queues = OrderedDict()  # key -> deque of _Waiter; order = whose turn is next
        self._lock = threading.Lock()  # held for a few lines, never across a switch

    def enter(self, key, timeout):
        """Take a permit, waiting at most `timeout` seconds; Busy if refused or timed out."""
        with self._lock:
            if self.free and not self.waiting:
                self.free -= 1
                return
            if self.waiting >= self.max_waiting and not self._shed_for(key):
                raise Busy("the admission queue is full")
            waiter = _Waiter()
            self._queues.setdefault(key, deque()).append(waiter)
            self.waiting += 1
            self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            waiter.event.wait(timeout)
        except BaseException:  # the greenlet was killed (client gone): never lose a permit handed over
            if self._withdraw(key, waiter):
                self.leave()
            raise
        if not self._withdraw(key, waiter):
            raise Busy("no database connection in time" if not waiter.refused else "the admission queue is full")

    def leave(self):
        """Give the permit back: straight to the next waiter in turn, if any."""
        with self._lock:
            while self._queues:
                key, queue = next(iter(self._queues.items()))
                waiter = queue.popleft()
                if queue:
                    self._queues.move_to_end(key)  # round-robin: this key goes to the back
                else:
                    del self._queues[key]
                self.waiting -= 1
                waiter.granted = True
                waiter.event.set()
                return
            self.free += 1

    def _withdraw(self, key, waiter):
        """After the wait: True if the permit was handed over, else leave the queue."""
        with self._lock:
            if not waiter.granted and not waiter.refused:
                self._remove(key, waiter)
            return waiter.granted

    def _remove(self, key, waiter):
        """Timed out: leave the queue (a linear scan of one client's queue, only on timeouts)."""
        queue = self._queues.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.waiting -= 1
            if not queue:
                del self._queues[key]

    def _shed_for(self, key):
        """The queue is full: refuse the newest waiter of the client with the most waiters, if it
        has more than `key` would after joining. True if a place was freed."""
        mine = len(self._queues.get(key, ()))
        heaviest = max(self._queues, key=lambda k: len(self._queues[k]), default=None)
        if heaviest is None or heaviest == key or len(self._queues[heaviest]) <= mine + 1:
            return False
        waiter = self._queues[heaviest].pop()
        if not self._queues[heaviest]:
            del self._queues[heaviest]
        self.waiting -= 1
        waiter.refused = True
        waiter.event.set()
        return True


def _client_key():
    """Who is asking, without the database: the bearer credential, else the session cookie, else
    the address (a queue key only: nothing is trusted from it)."""
    auth = request.headers.get("Authorization")
    if auth:
        return auth
    for name in ("session", "remember_token"):
        value = request.cookies.get(name)
        if value:
            return value
    return request.remote_addr or "-"


class BudgetPool(QueuePool):
    """The per-worker pool, with the admission gate (see the module docstring) in front of a
    request's first checkout. Background work (saving an answer, heartbeats, the orphan sweep), a
    request already admitted once, and a stream whose 200 is already sent bypass the gate and wait
    longer rather than fail an answer during a burst. Decided per checkout, in the greenlet or
    thread that asks."""

    def __init__(self, creator, queue_max=1000, **kwargs):  # not keyword-only: create_engine passes it
        super().__init__(creator, **kwargs)
        self._queue_max = queue_max
        size = self.size() + max(self._max_overflow, 0)
        reserve = 0 if size < 2 else max(1, size // 5)  # 10 -> 8 for requests, 2 kept for background
        self.gate = Gate(size - reserve, queue_max)
        self._gated = set()  # ids of the connection records checked out through the gate

    @property
    def _timeout(self):
        if _needs_admission():
            return self._request_timeout
        return max(self._request_timeout, BACKGROUND_POOL_TIMEOUT)

    @_timeout.setter
    def _timeout(self, value):
        self._request_timeout = value

    def _do_get(self):
        if not _needs_admission():
            return super()._do_get()
        self.gate.enter(_client_key(), self._request_timeout)
        g._capacity_admitted = True  # later checkouts of this request go straight to the pool
        try:
            record = super()._do_get()
        except BaseException:
            self.gate.leave()
            raise
        self._gated.add(id(record))
        return record

    def _do_return_conn(self, record):
        gated = id(record) in self._gated
        self._gated.discard(id(record))
        try:
            super()._do_return_conn(record)
        finally:
            if gated:
                self.gate.leave()

    def recreate(self):
        pool = super().recreate()
        pool._timeout = self._request_timeout
        pool._queue_max = self._queue_max
        pool.gate = Gate(self.gate.slots, self._queue_max)
        return pool


def _needs_admission():
    return has_request_context() and not g.get("_capacity_answered") and not g.get("_capacity_admitted")


def engine_options(config):
    """SQLALCHEMY_ENGINE_OPTIONS for the configured database, with the per-worker budget."""
    options = dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    options.setdefault("pool_pre_ping", False)  # webapp/db_ping.py pings only connections idle a while
    options["pool_size"] = config["DB_POOL_SIZE"]
    options["max_overflow"] = config["DB_MAX_OVERFLOW"]
    options["pool_timeout"] = config["DB_POOL_TIMEOUT"]
    options["poolclass"] = BudgetPool
    options["queue_max"] = config["DB_QUEUE_MAX"]
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
    """After db.init_app: 503 on pool exhaustion, SQLite's cooperative write lock, and the count of
    the requests this worker is serving."""
    from .extensions import db
    with app.app_context():
        install_sqlite_write_gate(db.engine)
    app.wsgi_app = app.extensions["open_requests"] = OpenRequests(app.wsgi_app)

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
        log.warning("no database connection for %s %s (%s): answered 503", request.method, request.path, exc)
        return busy_response()


class OpenRequests:
    """WSGI middleware: how many requests this worker is serving now, open streams included (a
    request counts from its call until its body is closed). Tells how busy the worker is, e.g. so
    that its generations read the model in wider windows in a burst (generation: Registry.window)."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app
        self.count = 0
        self._lock = threading.Lock()  # a greenlet lock in a worker; the dev server and tests use threads

    def _add(self, step):
        with self._lock:
            self.count += step

    def __call__(self, environ, start_response):
        self._add(1)
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            self._add(-1)
            raise
        return after_body(body, lambda: self._add(-1), environ)  # a file keeps the server's sendfile


def open_requests(app):
    """The requests `app` is serving in this process now (0 before init_app)."""
    counter = app.extensions.get("open_requests")
    return counter.count if counter is not None else 0


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
