"""Bursts against sign-in and sign-up on the live app (gunicorn, two workers): limits hold exactly,
nothing answers 5xx, and signed-in people are not starved. Timings are printed for bench/."""
import concurrent.futures as futures
import statistics
import threading
import time

import requests
from sqlalchemy import create_engine, func, select

from helpers import PASSWORD, csrf, make_user


def _post_all(url, payloads, workers):
    """Statuses of the POSTs, sent `workers` at a time. A 503 must say when to come back (the
    password pool's queue is full: load shed on purpose); it is reported as "503+Retry-After"."""
    def one(data):
        try:
            response = requests.post(url, data=data, timeout=60)
        except requests.RequestException as exc:
            return type(exc).__name__
        if response.status_code == 503 and response.headers.get("Retry-After", "").isdigit():
            return "503+Retry-After"
        return response.status_code
    with futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, payloads))


def test_forty_parallel_wrong_passwords_let_at_most_the_limit_through(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    laptop = requests.Session()  # alice's own browser/program, which has signed in before
    assert laptop.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200

    statuses = _post_all(base + "/auth/login", [{"username": "alice", "password": f"guess-{n}"} for n in range(40)], 40)
    refused = statuses.count(429)
    counted = sum(1 for s in statuses if s in (400, 401))
    shed = statuses.count("503+Retry-After")
    assert refused + counted + shed == 40, statuses  # never a 500, never a dropped connection
    assert counted <= 10  # LOGIN_LIMIT_PER_USER: 10 per minute
    assert shed <= 2, statuses  # 10 hashes fit in the two workers' password queues (unless one gets most)

    # The guesser cannot go on with the right password from a new device either...
    assert requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 429
    # ...but alice, from her known device, signs in.
    assert laptop.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200


def test_one_abuser_behind_a_shared_address_does_not_lock_out_known_devices(make_app, fresh_db, live_server):
    app = make_app()
    make_user(app)
    base = live_server.url
    colleague = requests.Session()
    assert colleague.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
    # Failures over many usernames from the same address use up the per-address limit (100/hour).
    statuses = []
    while statuses.count(429) < 10 and len(statuses) < 300:
        statuses += _post_all(base + "/auth/login",
                              [{"username": f"victim{len(statuses) + n}", "password": "x"} for n in range(8)], 8)
    assert set(statuses) <= {400, 401, 429, "503+Retry-After"} and statuses.count(429) >= 10
    assert sum(1 for s in statuses if s in (400, 401)) <= 100
    assert requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 429
    # Alice, from the browser she has signed in with before, is not locked out by her colleague.
    assert colleague.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).status_code == 200


def test_twelve_parallel_sign_ups_make_at_most_five_accounts_and_one_admin(app, fresh_db, live_server):
    from webapp.auth.setup import setup_token
    from webapp.models import User
    base = live_server.url
    with app.app_context():
        token = setup_token()
    clients = []
    for _ in range(12):
        session = requests.Session()
        clients.append((session, csrf(session, base + "/register")))
    barrier = threading.Barrier(12)

    def sign_up(n):
        session, csrf_token = clients[n]
        barrier.wait()
        try:
            return session.post(base + "/register", data={"username": f"new{n}", "password": "x" * 12,
                                                          "confirm": "x" * 12, "setup_token": token,
                                                          "csrf_token": csrf_token},
                                allow_redirects=False, timeout=60).status_code
        except requests.RequestException as exc:
            return type(exc).__name__
    with futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(sign_up, range(12)))
    assert set(statuses) <= {302, 422, 429}, statuses
    engine = create_engine(fresh_db)
    with engine.connect() as conn:
        accounts = conn.scalar(select(func.count()).select_from(User))
        admins = conn.scalar(select(func.count()).select_from(User).where(User.is_admin.is_(True)))
    engine.dispose()
    assert accounts <= 5 and admins == 1 and statuses.count(302) == accounts


def test_two_hundred_failed_sign_ins_do_not_starve_a_signed_in_reader(app, fresh_db, live_server):
    make_user(app)
    base = live_server.url
    token = requests.post(base + "/auth/login", data={"username": "alice", "password": PASSWORD}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    stop, reads, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = requests.get(base + "/conversations", headers=headers, timeout=30)
                (reads if response.status_code == 200 else errors).append(
                    (response.status_code, time.monotonic() - started))
            except requests.RequestException as exc:
                errors.append((type(exc).__name__, time.monotonic() - started))
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    started = time.monotonic()
    statuses = _post_all(base + "/auth/login", [{"username": f"nobody{n}", "password": "wrong"} for n in range(200)],
                         200)
    elapsed = time.monotonic() - started
    stop.set()
    for thread in readers:
        thread.join()
    latencies = sorted(seconds for _, seconds in reads)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    print(f"\n200 failed sign-ins in {elapsed:.1f} s: {statuses.count(400)}x400 {statuses.count(429)}x429 "
          f"{statuses.count('503+Retry-After')}x503; "
          f"reader: {len(reads)} reads, median {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms, errors {errors}")
    assert errors == []
    assert set(statuses) <= {400, 401, 429, "503+Retry-After"}, statuses
    assert len(reads) >= 5
    assert elapsed < 60
