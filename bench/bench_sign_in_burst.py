"""A burst of failed sign-ins against a running server while a signed-in user reads: what the reader sees.

    .venv/bin/python bench/bench_sign_in_burst.py http://127.0.0.1:8000 alice 'her password' [N]

Sends N (default 200) concurrent `POST /auth/login` for unknown users from this address while two
threads read `GET /conversations` with alice's bearer token, and prints the sign-ins' statuses and the
reader's latency (median, p99, max) and errors. The same scenario, with assertions, is
tests/security/test_sec_bursts.py.
"""
import concurrent.futures as futures
import statistics
import sys
import threading
import time
from collections import Counter

import requests


def main(base, username, password, count=200):
    token = requests.post(base + "/auth/login", data={"username": username, "password": password},
                          timeout=60).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    stop, reads, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = requests.get(base + "/conversations", headers=headers, timeout=30)
                (reads if response.status_code == 200 else errors).append(time.monotonic() - started)
            except requests.RequestException:
                errors.append(time.monotonic() - started)

    def attempt(n):
        try:
            return requests.post(base + "/auth/login", data={"username": f"nobody{n}-{time.time()}",
                                                             "password": "wrong"}, timeout=60).status_code
        except requests.RequestException as exc:
            return type(exc).__name__
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    with futures.ThreadPoolExecutor(count) as pool:
        statuses = Counter(pool.map(attempt, range(count)))
    elapsed = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    reads.sort()
    print(f"{count} failed sign-ins in {elapsed:.1f} s: {dict(statuses)}")
    print(f"reader: {len(reads)} reads, median {statistics.median(reads) * 1000:.0f} ms, "
          f"p99 {reads[min(len(reads) - 1, int(len(reads) * 0.99))] * 1000:.0f} ms, max {reads[-1] * 1000:.0f} ms, "
          f"{len(errors)} errors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 200)
