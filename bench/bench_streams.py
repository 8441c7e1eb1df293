"""Many answers streaming at once through gunicorn: latency added by the app, and how many
PostgreSQL connections the slow streams need (the design says: not one per stream).

Starts the Ollama-protocol test server (each answer: 100 tokens, 20 ms apart, ~2 s), a throwaway
PostgreSQL database (or TEST_DATABASE_URL), and gunicorn (2 workers x 32 threads), then runs N
concurrent streaming chats in N conversations and samples pg_stat_activity while they run.

    .venv/bin/python bench/bench_streams.py [N] [--sqlite]
"""
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef")

import psycopg  # noqa: E402
import requests  # noqa: E402
from flask_migrate import upgrade  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.auth.accounts import create_user  # noqa: E402

from live import LiveServer, login, sse_events  # noqa: E402
from ollama_server import FakeOllama  # noqa: E402
from pg import TestDatabase  # noqa: E402

TOKENS, GAP = 100, 0.02


def one_stream(server, auth, results):
    started = time.perf_counter()
    response = requests.post(server.url + "/chat/", json={"prompt": "go", "stream": True}, headers=auth,
                             stream=True, timeout=60)
    first = None
    for name, data in sse_events(response):
        if name == "token" and first is None:
            first = time.perf_counter() - started
        if name in ("done", "error"):
            results.append((first, time.perf_counter() - started, data["status"]))
            if data["status"] != "complete":
                print("  failed:", data.get("error"))


def main():
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    count = int(numbers[0]) if numbers else 50
    ollama = FakeOllama().start()
    ollama.script(reply="tok " * TOKENS, delay=GAP)
    sqlite = "--sqlite" in sys.argv
    database = None if sqlite else TestDatabase()
    url = "sqlite:////tmp/bench-streams.db" if sqlite else database.url
    if sqlite and os.path.exists("/tmp/bench-streams.db"):
        os.remove("/tmp/bench-streams.db")
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        upgrade()
        create_user("bench", "bench-password")
    server = LiveServer(url, ollama.url, workers=2, LLM_MAX_PARALLEL=0, USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0,
                        GUNICORN_THREADS=32, LLM_READ_TIMEOUT=30,
                        STREAM_FLUSH_SECONDS=0.25, HEARTBEAT_SECONDS=1, LOG_LEVEL="WARNING").start()
    try:
        auth = login(server.url, "bench", "bench-password")
        direct = time.perf_counter()
        requests.post(ollama.url + "/api/chat", json={"model": "tinyllama", "messages": [
            {"role": "user", "content": "go"}]}, stream=True).iter_lines().__next__()
        direct_first = time.perf_counter() - direct
        single = []
        for _ in range(5):
            one_stream(server, auth, single)
        results, peak, busy = [], [0], [0]
        threads = [threading.Thread(target=one_stream, args=(server, auth, results)) for _ in range(count)]
        stop = threading.Event()

        def sample():
            with psycopg.connect(database.admin_url, autocommit=True) as conn:
                while not stop.is_set():
                    total, active = conn.execute(
                        "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity "
                        "WHERE datname = %s", (database.name,)).fetchone()
                    peak[0] = max(peak[0], total)
                    if time.perf_counter() - started > 1.0:  # mid-stream, after the burst of turn starts
                        busy[0] = max(busy[0], active)
                    time.sleep(0.05)
        started = time.perf_counter()
        sampler = threading.Thread(target=sample if database else stop.wait)
        sampler.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        firsts = sorted(r[0] for r in results)
        totals = sorted(r[1] for r in results)
        print(f"{count} concurrent streams of {TOKENS} tokens ({TOKENS * GAP:.1f} s each at the model):")
        print(f"  completed: {sum(r[2] == 'complete' for r in results)}/{count} in {wall:.2f} s wall")
        print(f"  one stream alone: time to first token {statistics.median(r[0] for r in single) * 1000:.0f} ms "
              f"(direct from the model: {direct_first * 1000:.0f} ms)")
        print(f"  time to first token under the burst: "
              f"median {statistics.median(firsts) * 1000:.0f} ms, "
              f"p95 {firsts[int(len(firsts) * .95) - 1] * 1000:.0f} ms")
        print(f"  whole answer: median {statistics.median(totals):.2f} s, max {totals[-1]:.2f} s")
        if database:
            print(f"  PostgreSQL connections of the app: {peak[0] - 1} open at peak (the two workers' pools), "
                  f"at most {busy[0] - 1} in use at once mid-stream (for {count} live streams)")
    finally:
        server.stop()
        ollama.stop()
        if database:
            database.drop()


if __name__ == "__main__":
    main()
