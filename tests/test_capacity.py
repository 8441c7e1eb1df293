"""Capacity under gunicorn as shipped (gevent workers): slow clients, many open streams, SQLite under
concurrency, and a spent database connection budget. Outcomes are asserted (no 5xx, no starvation,
bounded counts); timings belong in bench/."""
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests

from helpers import PASSWORD, make_user
from live import LiveServer, login, sse_events

# One person opens every stream here, all at once at the model: the per-person limits and the
# model's queue are off (0), as in the many-stream bench.
NO_USER_LIMITS = {"USER_MAX_RUNNING": 0, "USER_MAX_PER_MINUTE": 0, "LLM_MAX_PARALLEL": 0}


@pytest.fixture
def servers(app, ollama, database_url):
    started = []

    def start(**env):
        server = LiveServer(database_url, ollama.url, **{**NO_USER_LIMITS, **env}).start()
        started.append(server)
        make_user(app) if len(started) == 1 else None
        server.auth = login(server.url, "alice", PASSWORD)
        return server
    yield start
    for server in started:
        server.stop()


def worker_pids(server):
    """The gunicorn workers: children of the master process."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid:
            pids.append(int(stat.parent.name))
    return pids


def os_threads(pid):
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def stream_turn(server, prompt, timeout=30):
    """One streamed turn, read to the end: (text, final event name, final data)."""
    with requests.post(server.url + "/chat/", json={"prompt": prompt, "stream": True}, headers=server.auth,
                       stream=True, timeout=timeout) as response:
        assert response.status_code == 200, response.text
        text = ""
        for name, data in sse_events(response):
            if name == "token":
                text += data["text"]
            elif name in ("done", "failed"):
                return text, name, data
    raise AssertionError("the stream ended without done/failed")


class HealthProbe:
    """Calls /health every 0.1 s on its own connection and keeps the latencies."""

    def __init__(self, server):
        self.server, self.latencies, self.failures = server, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = requests.get(self.server.url + "/health", timeout=5)
                if response.status_code != 200:
                    self.failures.append(response.status_code)
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(0.1)


# ---- the worker model --------------------------------------------------------------------------------

def test_workers_are_gevent_with_cooperative_database_waits(servers):
    server = servers()
    log = server.log_text()
    assert "Using worker: gevent" in log
    assert re.search(r"worker \d+: gevent, cooperative waits \(psycopg wait_(poll|select|selector)\)", log), log
    assert "BUT" not in log
    # The loaded app is left out of the worker's garbage collections (gc.freeze), after it loaded.
    frozen = [int(count) for count in re.findall(r"; (\d+) objects of the loaded app frozen", log)]
    assert frozen and min(frozen) > 50_000, log


def test_consecutive_turns_reuse_one_connection_to_the_model(servers, ollama):
    server = servers()
    ollama.connections = 0
    for prompt in ("one", "two", "three"):
        response = requests.post(server.url + "/chat/", json={"prompt": prompt}, headers=server.auth, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "complete"
    assert len(ollama.chat_requests) == 3
    assert ollama.connections <= 1  # at most one new connection (the start-up /health may have opened it)


# ---- slow clients ------------------------------------------------------------------------------------

def slow_header_socket(server, stop):
    """Slowloris: a request whose headers arrive one line every 0.5 s, forever."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    try:
        while not stop.is_set():
            sock.sendall(b"X-Slow: 1\r\n")
            stop.wait(0.5)
    except OSError:
        pass  # the server gave up on it (gunicorn's keepalive bounds the wait for headers)
    finally:
        sock.close()


def slow_body_socket(server, stop):
    """A body announced as 100 kB and trickled a byte at a time."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST /chat/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: {server.auth['Authorization']}\r\n".encode()
                 + b"Content-Length: 100000\r\n\r\n{")
    try:
        while not stop.is_set():
            sock.sendall(b" ")
            stop.wait(0.5)
    except OSError:
        pass
    finally:
        sock.close()


def non_reading_socket(server, opened):
    """Asks for a long stream, then never reads: the server's writes to it must block only it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    body = b'{"prompt": "say a lot", "stream": true}'
    sock.sendall(b"POST /chat/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: {server.auth['Authorization']}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    opened.append(sock)


def test_slow_clients_cannot_block_other_streams(servers, ollama):
    server = servers()
    ollama.script(reply="word " * 4000)  # the non-readers' answers: ~200 kB of frames each, sent at once
    stop, threads, stuck = threading.Event(), [], []
    try:
        for _ in range(3):
            non_reading_socket(server, stuck)
        assert ollama.wait_for_event("chat_start", timeout=10)
        for target in [slow_header_socket] * 40 + [slow_body_socket] * 20:
            thread = threading.Thread(target=target, args=(server, stop), daemon=True)
            thread.start()
            threads.append(thread)
        time.sleep(1.0)  # every slow socket is connected and dribbling
        ollama.script(reply="one two three four five six seven eight", delay=0.05)
        with HealthProbe(server) as probe, ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: stream_turn(server, f"fast {i}", timeout=20), range(8)))
        assert all(name == "done" and text == "one two three four five six seven eight"
                   for text, name, _ in results), results
        assert probe.failures == [] and probe.latencies, probe.failures
        assert max(probe.latencies) < 2.0, probe.latencies  # not starved (timings: bench/)
    finally:
        stop.set()
        for sock in stuck:
            sock.close()
        for thread in threads:
            thread.join(5)
    log = server.log_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 300:][:3000]


# ---- many open streams on one worker -----------------------------------------------------------------

def test_sixty_open_streams_on_one_worker_do_not_starve_health(servers, ollama):
    # The subject here is streams already open (a burst of starts: the admission tests below).
    server = servers(WEB_CONCURRENCY=1, STREAM_FLUSH_SECONDS=0.25)
    reply = " ".join(f"w{i}" for i in range(40))
    ollama.script(reply=reply, delay=0.05)  # ~2 s per answer: all 60 are open at once
    [worker] = worker_pids(server)
    peak = {"open": 0, "threads": 0}

    def watch(stop):
        while not stop.is_set():
            if ollama.active_streams() > peak["open"]:
                peak["open"], peak["threads"] = ollama.active_streams(), max(peak["threads"], os_threads(worker))
            stop.wait(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
    watcher.start()
    with HealthProbe(server) as probe, ThreadPoolExecutor(60) as pool:
        results = list(pool.map(lambda i: stream_turn(server, f"q{i}", timeout=25), range(60)))
    stop.set()
    watcher.join(5)
    assert [name for _, name, _ in results] == ["done"] * 60, [d for _, n, d in results if n != "done"][:3]
    assert all(text == reply for text, _, _ in results)
    assert peak["open"] >= 50  # they really were open together
    # 60 streams, 60 generations and their watchdog, without a thread each: greenlets.
    assert peak["threads"] < 20, peak
    assert probe.failures == [] and max(probe.latencies) < 2.0, (probe.failures, probe.latencies)


# ---- SQLite under gevent -----------------------------------------------------------------------------

@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_serves_concurrent_streams_on_two_workers(servers, ollama, app):
    server = servers(WEB_CONCURRENCY=2)  # flushes every 0.05 s (LiveServer): many writers at once
    reply = " ".join(f"t{i}" for i in range(30))
    ollama.script(reply=reply, delay=0.03)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: stream_turn(server, f"q{i}", timeout=25), range(20)))
    assert [name for _, name, _ in results] == ["done"] * 20, [d for _, n, d in results if n != "done"][:3]
    assert all(text == reply for text, _, _ in results)
    assert "database is locked" not in server.log_text()
    from sqlalchemy import func, select

    from webapp.extensions import db
    from webapp.models import Message
    with app.app_context():
        statuses = db.session.execute(select(Message.status, func.count()).where(Message.role == "assistant")
                                      .group_by(Message.status)).all()
    assert dict(statuses) == {"complete": 20}


# ---- the connection budget ---------------------------------------------------------------------------

def page_session(server):
    session = requests.Session()
    html = session.get(server.url + "/login", timeout=5).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    response = session.post(server.url + "/login", data={"username": "alice", "password": PASSWORD,
                                                          "csrf_token": token}, allow_redirects=False, timeout=5)
    assert response.status_code == 302
    return session


def test_spent_connection_budget_answers_503_with_retry_after(servers, database_url):
    server = servers(WEB_CONCURRENCY=1, DB_POOL_SIZE=1, DB_POOL_TIMEOUT=0.5)
    browser = page_session(server)
    # Hold the worker's only connection: a request blocked on a table lock keeps it checked out.
    locker = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=False)
    held = {}
    try:
        locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        holder = threading.Thread(target=lambda: held.update(response=requests.get(
            server.url + "/conversations", headers=server.auth, timeout=20)), daemon=True)
        holder.start()
        time.sleep(0.5)  # the holder is waiting on the lock, with the connection
        api = requests.get(server.url + "/conversations", headers=server.auth, timeout=10)
        page = browser.get(server.url + "/", timeout=10)
        fragment = browser.get(server.url + "/", headers={"HX-Request": "true"}, timeout=10)
        health = requests.get(server.url + "/health", timeout=5)
    finally:
        locker.rollback()
        locker.close()
    holder.join(20)
    assert api.status_code == 503 and api.headers["Retry-After"] == "1"
    error = api.json()["error"]
    assert error["code"] == "busy" and error["request_id"] == api.headers["X-Request-ID"]
    assert page.status_code == 503 and page.headers["Retry-After"] == "1"
    assert "text/html" in page.headers["Content-Type"] and "try again" in page.text
    assert fragment.status_code == 503 and "text/plain" in fragment.headers["Content-Type"]
    assert health.status_code == 200  # liveness needs no database connection
    assert held["response"].status_code == 200  # the held request finished once the lock went
    assert requests.get(server.url + "/conversations", headers=server.auth, timeout=5).status_code == 200
    assert " 500 " not in server.log_text()


GEVENT_SQLITE_SCRIPT = r"""
from gevent import monkey; monkey.patch_all()
import json, sys, time
import gevent
from sqlalchemy import text
from webapp import create_app
from webapp.extensions import db

app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": sys.argv[1]})
with app.app_context():
    db.session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)"))
    db.session.execute(text("INSERT INTO t VALUES (1, 0)"))
    db.session.commit()
ticks, errors = [], []

def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

def holder():
    with app.app_context():
        db.session.execute(text("UPDATE t SET n = n + 1"))
        gevent.sleep(0.5)  # a greenlet switch in the middle of a write transaction
        db.session.commit()

def writer():
    gevent.sleep(0.1)
    with app.app_context():
        try:
            db.session.execute(text("UPDATE t SET n = n + 10"))
            db.session.commit()
        except Exception as exc:
            errors.append(str(exc).splitlines()[0])

tick = gevent.spawn(ticker)
gevent.joinall([gevent.spawn(holder), gevent.spawn(writer)])
tick.kill()
with app.app_context():
    n = db.session.execute(text("SELECT n FROM t")).scalar()
gaps = [b - a for a, b in zip(ticks, ticks[1:])]
print(json.dumps({"n": n, "errors": errors, "max_gap": max(gaps)}))
"""


def test_sqlite_writers_wait_for_the_lock_without_freezing_the_event_loop(tmp_path):
    """sqlite3's own busy wait sleeps in C: under gevent it freezes every greenlet of the worker,
    including the one holding the lock, so the wait could only end in "database is locked". The
    write lock is taken cooperatively instead: the waiter yields, the holder commits, both succeed."""
    import json
    import subprocess
    import sys
    script = tmp_path / "gevent_sqlite.py"
    script.write_text(GEVENT_SQLITE_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(script), f"sqlite:///{tmp_path / 'g.db'}"], cwd=root,
                          capture_output=True, text=True, timeout=60, env={**__import__("os").environ,
                                                                            "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["n"] == 11, result
    assert result["max_gap"] < 0.3, result  # the loop kept turning while the writer waited


def test_waiting_on_the_model_holds_no_database_connection(servers, ollama):
    """DESIGN rule 2: with a pool of 2 connections, 20 answers waiting on a slow model all finish and no
    request is refused: neither the requests nor the generations hold a connection while they wait."""
    server = servers(WEB_CONCURRENCY=1, DB_POOL_SIZE=2, DB_POOL_TIMEOUT=2, STREAM_FLUSH_SECONDS=0.25)
    reply = " ".join(f"s{i}" for i in range(15))
    ollama.script(reply=reply, delay=0.15)  # ~2.3 s per answer, all of them at once

    def one(i):
        time.sleep(i * 0.05)  # turns start one after another; the waiting overlaps
        return stream_turn(server, f"slow {i}", timeout=25)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert [name for _, name, _ in results] == ["done"] * 20, [d for _, n, d in results if n != "done"][:3]
    assert all(text == reply for text, _, _ in results)
    assert " 503 " not in server.log_text()


# ---- admission: a burst queues instead of failing -------------------------------------------------------

def test_gate_hands_permits_round_robin_across_clients_and_sheds_the_heaviest():
    """The admission gate itself (webapp/capacity.py), with real threads: permits go to waiters
    in turn across clients (FIFO within one), a full queue refuses the newest waiter of the client
    with the most waiters to make room for another client, else the newcomer, and a wait times out."""
    from webapp.capacity import Busy, Gate
    gate = Gate(slots=1, max_waiting=4)
    gate.enter("a", 1)  # the one permit
    order, refused, threads = [], [], []

    def wait(key, label, timeout=10):
        try:
            gate.enter(key, timeout)
        except Busy:
            refused.append(label)
            return
        order.append(label)
        gate.leave()
    for key, label in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1")]:
        thread = threading.Thread(target=wait, args=(key, label), daemon=True)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while gate.waiting + len(refused) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.005)  # queued (or refused) in this order
    # The queue held 4: c1 came last into a full queue and took the place of a3 (a had 3 waiting).
    assert refused == ["a3"] and gate.waiting == 4
    assert gate.peak_waiting == 4
    gate.leave()
    for thread in threads:
        thread.join(5)
    assert order == ["a1", "b1", "c1", "a2"], order  # round-robin: a, b, c, then a again
    assert gate.free == 1 and gate.waiting == 0
    # A full queue of one client refuses that client's newcomer at once; a wait runs out.
    small = Gate(slots=1, max_waiting=0)
    small.enter("a", 1)
    started = time.monotonic()
    with pytest.raises(Busy):
        small.enter("a", 10)
    assert time.monotonic() - started < 1
    one = Gate(slots=1, max_waiting=5)
    one.enter("a", 1)
    started = time.monotonic()
    with pytest.raises(Busy):
        one.enter("b", 0.2)
    assert 0.15 < time.monotonic() - started < 3 and one.waiting == 0
    one.leave()
    assert one.free == 1


def test_a_burst_of_stream_starts_queues_for_a_small_pool_and_all_complete(servers, ollama, app):
    """150 streams started at the same instant on one worker with 3 pooled connections (two admit
    requests, one is kept for saving answers) and the default wait: they wait their turn holding
    nothing, and every one completes, none answered 503 (with a plain 1-s pool wait, most were)."""
    server = servers(WEB_CONCURRENCY=1, DB_POOL_SIZE=3, STREAM_FLUSH_SECONDS=0.25)  # the default wait
    reply = "one two three four five"
    ollama.script(reply=reply, delay=0.02)
    count = 150
    barrier = threading.Barrier(count)

    def one(i):
        barrier.wait(30)
        return stream_turn(server, f"burst {i}", timeout=90)
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    assert [name for _, name, _ in results] == ["done"] * count, [d for _, n, d in results if n != "done"][:3]
    assert all(text == reply for text, _, _ in results)
    log = server.log_text()
    assert " 503 " not in log and "Traceback" not in log
    # Ending together, they were saved in shared transactions (generation._Finisher): each one whole.
    from sqlalchemy import func, select

    from webapp.extensions import db
    from webapp.models import Conversation, Message
    with app.app_context():
        answers = db.session.execute(select(Message.status, Message.content, func.count()).where(
            Message.role == "assistant").group_by(Message.status, Message.content)).all()
        busy = db.session.scalar(select(func.count()).where(Conversation.active_message_id.is_not(None)))
    assert answers == [("complete", reply, count)] and busy == 0


def test_an_overflowing_admission_queue_answers_503_busy_at_once_but_not_to_another_client(
        servers, database_url, app):
    """With the one admitting connection held and a queue of 2: a third request of the same client
    is refused at once (503 busy, Retry-After), long before the wait would run out; another client's
    request takes the place of that client's newest waiter instead of being shut out; the queued
    ones complete once the connection is free."""
    server = servers(WEB_CONCURRENCY=1, DB_POOL_SIZE=1, DB_POOL_TIMEOUT=30, DB_QUEUE_MAX=2)
    make_user(app, "bob")
    other = login(server.url, "bob", PASSWORD)  # another client: its own queue key
    locker = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=False)
    results, threads = {}, []

    def get(label, headers):
        started = time.monotonic()
        response = requests.get(server.url + "/conversations", headers=headers, timeout=60)
        results[label] = (response, time.monotonic() - started)

    def launch(label, headers):
        thread = threading.Thread(target=get, args=(label, headers), daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(0.5)  # in this order
    try:
        locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        for label in ("holder", "alice1", "alice2"):  # the holder waits on the lock, with the connection
            launch(label, server.auth)
        launch("alice3", server.auth)  # the queue (2) is full of alice: refused at once
        launch("bob", other)  # bob takes alice2's place
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = dict(results)
    finally:
        locker.rollback()
        locker.close()
    for thread in threads:
        thread.join(30)
    assert set(refused) == {"alice3", "alice2"}, refused
    for label in ("alice3", "alice2"):
        response, took = refused[label]
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "busy"
        assert took < 10  # refused at once, not after DB_POOL_TIMEOUT
    assert [results[label][0].status_code for label in ("holder", "alice1", "bob")] == [200, 200, 200]
    assert " 500 " not in server.log_text()


def test_a_group_commit_cut_short_by_a_kill_leaves_every_answer_to_save_its_own():
    """Shutdown may kill the greenlet leading a batch of final saves (a non-streaming turn generates
    in its request, and gunicorn kills requests past the graceful timeout): the others in the batch,
    and the killed one, then save their own answers instead of being told "failed"."""
    import threading
    import time

    from webapp.generation import _Finisher

    class Killed(BaseException):
        pass

    calls, first_running = [], threading.Event()
    release = threading.Event()

    def commit(items):
        calls.append(list(items))
        if items == ["a"]:  # the first save runs while b and c queue up behind it
            first_running.set()
            release.wait(5)
        elif len(items) > 1:  # the batch b leads: b is killed while committing it
            raise Killed()
        return [1] * len(items)

    finisher = _Finisher()
    finisher._commit = commit
    results = {}

    def save(name):
        try:
            results[name] = finisher.save(name)
        except Killed:
            results[name] = "killed"

    threads = {name: threading.Thread(target=save, args=(name,)) for name in "abc"}
    threads["a"].start()
    assert first_running.wait(5)
    threads["b"].start()
    while len(finisher._pending) < 1:
        time.sleep(0.001)
    threads["c"].start()
    while len(finisher._pending) < 2:
        time.sleep(0.001)
    release.set()
    for thread in threads.values():
        thread.join(5)
    assert results == {"a": 1, "b": "killed", "c": 1}
    assert ["b", "c"] in calls and ["b"] in calls and ["c"] in calls  # each saved alone after the cut
    assert not finisher._busy and finisher._pending == []


def test_open_requests_counts_a_request_until_its_body_is_closed():
    """capacity.OpenRequests: a streamed body counts while it is being sent, and a request counts no
    more once its body is closed or its app raised (the count widens generations' windows)."""
    from webapp.capacity import OpenRequests

    seen = []

    def streaming(environ, start_response):
        start_response("200 OK", [])
        if environ.get("PATH_INFO") == "/fail":
            raise RuntimeError("broken view")

        def body():
            seen.append(counted.count)
            yield b"one"
            seen.append(counted.count)
            yield b"two"
        return body()

    counted = OpenRequests(streaming)
    first = counted({"PATH_INFO": "/"}, lambda *args: None)
    second = counted({"PATH_INFO": "/"}, lambda *args: None)
    assert counted.count == 2 and b"".join(first) == b"onetwo" and seen == [2, 2]
    first.close()
    assert counted.count == 1
    next(iter(second))
    second.close()  # a client gone mid-stream: the server closes the body
    with pytest.raises(RuntimeError):
        counted({"PATH_INFO": "/fail"}, lambda *args: None)
    assert counted.count == 0


def test_the_app_counts_the_requests_it_serves(app):
    from webapp import capacity

    during = []
    app.add_url_rule("/_count", "count", lambda: str(during.append(capacity.open_requests(app))))
    client = app.test_client()
    assert capacity.open_requests(app) == 0
    with client.get("/_count") as response:  # closed at the end of the block, as a server closes it
        assert response.status_code == 200
    assert during == [1] and capacity.open_requests(app) == 0
