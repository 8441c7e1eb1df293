"""The whole performance table of issue 11 in one run: the app against the model server it fronts,
side by side, and a Markdown table of the results.

    .venv/bin/python bench/run.py --quick      # ~3 minutes: small sizes, fewer repeats
    .venv/bin/python bench/run.py              # full: 1,000 streams, 10,000 chats x 100 messages

What runs (all on this machine, loopback only):
- a throwaway PostgreSQL cluster (tests/pg.py; or TEST_DATABASE_URL), schema by `flask db upgrade`,
  users by `flask create-user`;
- bench/model_server.py, an asyncio Ollama-protocol server that holds its pacing at 1,000 streams;
- the app under the production gunicorn config (`-c python:webapp.gunicorn_conf`, whatever worker
  class it names), WEB_CONCURRENCY=2, bearer tokens over the JSON API;
- this process: one asyncio client (aiohttp) for every load; the "direct" columns are the same
  client calling the model server's /api/chat itself, so they show what the client and model server
  cost and that they keep up.

Sections: 1. added latency per turn (c=1, interleaved repeats, median of medians) with TTFT and CPU
ms per turn for each process; 2. throughput at c=16 and a count of every turn's messages in the
database; 3. 64/256/1,000 concurrent API streams; 4. cross-worker follow latency (two gunicorn
instances on one database); 5. history at scale (bulk-loaded with COPY).

Extra app environment: `--env NAME=VALUE` (repeatable), e.g. to switch off per-person limits.
"""
import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402

from pg import TestDatabase  # noqa: E402

PY = sys.executable


def production_config():
    """gunicorn's `-c` argument as the Dockerfile's CMD gives it (`python:webapp.gunicorn_conf` or
    `webapp/gunicorn_conf.py`): the bench serves the app exactly as production does."""
    found = re.search(r"gunicorn -c (\S+)", (ROOT / "Dockerfile").read_text())
    return found.group(1) if found else "webapp/gunicorn_conf.py"


GUNICORN_CONFIG = production_config()
SECRET = "bench-secret-key-long-enough-0123456789abcdef"
PASSWORD = "bench-password-123"
MODEL = "tinyllama"
WORDS = ("model answer context token stream python database question reply system prompt window "
         "cluster replica worker thread socket").split()   # 'replica' is in every chat; 'zebra' in one


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values, p):
    """The p-th percentile (nearest rank) of values, or None."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def ms(value, digits=1):
    return "–" if value is None else f"{value * 1000:.{digits}f}"


# -- processes ------------------------------------------------------------------------------------

class ModelServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.log = open(f"/tmp/bench-model-{self.port}.log", "w")
        self.process = subprocess.Popen([PY, str(ROOT / "bench" / "model_server.py"), str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.url + "/api/version", self.process)
        boost(self.process.pid)
        return self

    def stop(self, keep_log=False):
        stop_process(self.process)
        self.log.close()
        if not keep_log:
            os.remove(self.log.name)


class App:
    """The app as deployed: gunicorn with the production config file, configured by the environment."""

    def __init__(self, database_url, ollama_url, workers, extra_env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": database_url, "OLLAMA_URL": ollama_url,
                    "SECRET_KEY": SECRET, "WEB_CONCURRENCY": str(workers), "PORT": str(self.port),
                    "DEFAULT_MODEL": MODEL, "TOKEN_EXPIRES_MINUTES": "600", "LLM_MAX_PARALLEL": "0",
                    "USER_MAX_RUNNING": "0", "USER_MAX_PER_MINUTE": "0",
                    **extra_env}

    def start(self):
        self.log = open(f"/tmp/bench-app-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [PY, "-m", "gunicorn", "-c", GUNICORN_CONFIG, "webapp:create_app()"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))  # not the client's boost: plain priority
        wait_http(self.url + "/health", self.process, self.log.name)
        return self

    def processes(self):
        try:
            master = psutil.Process(self.process.pid)
            return [master] + master.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self):
        return self.processes()[1:]

    def stop(self, keep_log=False):
        stop_process(self.process)
        self.log.close()
        if not keep_log:
            os.remove(self.log.name)
        else:
            print(f"log kept: {self.log.name}", file=sys.stderr)


PRIORITY = -5


def boost(pid):
    """Run the model server and the client at a higher priority (nice -5) than everything else, the app
    included: in production they are other machines, and on a box shared with other work they must
    keep their pacing for the direct columns to be a true reference. Needs root; skipped otherwise."""
    if PRIORITY:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, PRIORITY)
        except OSError:
            pass


def wait_http(url, process, log=None):
    import urllib.request
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited: " + (Path(log).read_text()[-3000:] if log else ""))
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def stop_process(process):
    if process and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def flask(database_url, *args, stdin=None):
    env = {**os.environ, "FLASK_APP": "webapp", "DATABASE_URL": database_url, "SECRET_KEY": SECRET}
    return subprocess.run([PY, "-m", "flask", *args], cwd=ROOT, env=env, input=stdin, text=True,
                          check=True, capture_output=True).stdout


class Cpu:
    """CPU seconds (user + system) of each group of processes, read from /proc via psutil."""

    def __init__(self, groups):
        self.groups = groups  # name -> callable returning psutil.Process list

    def snapshot(self):
        shot = {}
        for name, find in self.groups.items():
            shot[name] = {}
            for proc in find():
                try:
                    times = proc.cpu_times()
                    shot[name][proc.pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        shot["box"] = sum(psutil.cpu_times()[:3])  # user + nice + system of the whole machine
        return shot

    @staticmethod
    def delta(before, after):
        out = {}
        for name, pids in after.items():
            if name == "box":
                continue
            out[name] = sum(max(0.0, t - before[name].get(pid, 0.0)) for pid, t in pids.items())
        out["box"] = after["box"] - before["box"]
        return out


# -- the client -------------------------------------------------------------------------------------

class Sse:
    """Incremental text/event-stream parser: feed bytes, get (event, data) pairs."""

    def __init__(self):
        self.buf = b""
        self.name, self.data = None, []

    def feed(self, chunk):
        self.buf += chunk
        events = []
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                return events
            line, self.buf = self.buf[:end].rstrip(b"\r").decode(), self.buf[end + 1:]
            if line == "":
                if self.data:
                    events.append((self.name or "message", json.loads("\n".join(self.data))))
                self.name, self.data = None, []
            elif line.startswith(":"):
                continue
            elif line.startswith("event:"):
                self.name = line[6:].strip()
            elif line.startswith("data:"):
                self.data.append(line[5:].lstrip())


V1_HISTORY = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "and then?"}]


class Client:
    def __init__(self, app_url, model_url, token=None):
        self.app_url, self.model_url = app_url, model_url
        self.token = token
        self.session = None

    async def __aenter__(self):
        self.session = aiohttp.ClientSession(
            # idle connections are dropped before gunicorn's keepalive (5 s) closes them under a request
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=60))
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    def auth(self, token=None):
        return {"Authorization": f"Bearer {token or self.token}", "Content-Type": "application/json"}

    async def login(self, username):
        async with self.session.post(self.app_url + "/auth/login",
                                     data={"username": username, "password": PASSWORD}) as r:
            r.raise_for_status()
            return (await r.json())["access_token"]

    # one request each; return (seconds, ok, extra)
    async def app_turn(self, prompt="hi", conversation_id=None, token=None):
        body = {"prompt": prompt}
        if conversation_id:
            body["conversation_id"] = conversation_id
        started = time.perf_counter()
        async with self.session.post(self.app_url + "/chat/", data=json.dumps(body),
                                     headers=self.auth(token)) as r:
            data = await r.read()
            took = time.perf_counter() - started
            ok = r.status == 200
        result = json.loads(data) if ok else None
        ok = ok and result.get("status") == "complete"
        return took, ok, result

    async def v1_turn(self):
        """The OpenAI SDK's usual call: a system prompt and two earlier messages sent with the prompt,
        no conversation named (each call opens one with the whole history)."""
        body = {"model": MODEL, "messages": V1_HISTORY}
        started = time.perf_counter()
        async with self.session.post(self.app_url + "/v1/chat/completions", data=json.dumps(body),
                                     headers=self.auth()) as r:
            data = await r.read()
            took = time.perf_counter() - started
            ok = r.status == 200
        ok = ok and json.loads(data)["choices"][0]["finish_reason"] == "stop"
        return took, ok, None

    def direct_body(self, prompt="hi"):
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True})

    async def direct_turn(self, prompt="hi"):
        started = time.perf_counter()
        async with self.session.post(self.model_url + "/api/chat", data=self.direct_body(prompt),
                                     headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
            took = time.perf_counter() - started
            ok = r.status == 200 and b'"done":true' in data
        return took, ok, None

    async def app_stream(self, token=None, deadline=600):
        """A streamed POST /chat/: (ttft, total, completed)."""
        started = time.perf_counter()
        first, tail = None, b""
        try:
            async with self.session.post(self.app_url + "/chat/", data=json.dumps({"prompt": "go", "stream": True}),
                                         headers=self.auth(token), timeout=aiohttp.ClientTimeout(total=deadline)) as r:
                if r.status != 200:
                    return None, None, False
                async for chunk in r.content.iter_any():
                    if first is None and b"event: token" in tail[-16:] + chunk:
                        first = time.perf_counter() - started
                    tail = (tail + chunk)[-4096:]
            total = time.perf_counter() - started
        except (TimeoutError, aiohttp.ClientError):
            return first, None, False
        done = tail.rfind(b"event: done")
        return first, total, done >= 0 and re.search(rb'"status": ?"complete"', tail[done:]) is not None

    async def direct_stream(self, deadline=600):
        started = time.perf_counter()
        first, tail = None, b""
        try:
            async with self.session.post(self.model_url + "/api/chat", data=self.direct_body("go"),
                                         headers={"Content-Type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=deadline)) as r:
                async for chunk in r.content.iter_any():
                    if first is None and b'"done":false' in chunk:
                        first = time.perf_counter() - started
                    tail = (tail + chunk)[-512:]
            total = time.perf_counter() - started
        except (TimeoutError, aiohttp.ClientError):
            return first, None, False
        return first, total, b'"done":true' in tail

    async def script(self, tokens, gap):
        async with self.session.post(self.model_url + "/_bench/script",
                                     data=json.dumps({"tokens": tokens, "gap": gap})) as r:
            r.raise_for_status()

    async def model_stats(self):
        async with self.session.get(self.model_url + "/_bench/stats") as r:
            return await r.json()


class StreamProbe(asyncio.Protocol):
    """One streamed request on its own connection, timed with as little client work as possible.

    For the bursts of section 3 (1,000 streams = 100,000 chunks in 2 s on a 2-core box shared with
    the app) aiohttp's per-chunk machinery is too dear; this protocol only notes the first chunk that
    carries a token and the end of the chunked body (or the connection's close)."""

    def __init__(self, request, marker, finished, started):
        self.request, self.marker, self.finished = request, marker, finished
        self.started = started  # before connecting: setting up 1,000 connections at once is part of it
        self.first = None
        self.tail = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        tail = self.tail[-32:] + data
        if self.first is None and self.marker in tail:
            self.first = time.perf_counter() - self.started
        self.tail = (self.tail + data)[-4096:] if len(data) < 4096 else tail[-4096:]
        if self.tail.endswith(b"\r\n0\r\n\r\n"):
            self.end()
            self.transport.close()

    def connection_lost(self, exc):
        self.end()

    def end(self):
        if not self.finished.done():
            self.finished.set_result(time.perf_counter() - self.started)


async def probe_stream(url, path, body, headers, marker, deadline=600):
    """(ttft, total, tail) of one streamed POST on a fresh connection; total None on a timeout."""
    host, port = url.split("//")[1].split(":")
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n{head}\r\n").encode() + data
    loop = asyncio.get_running_loop()
    finished, started = loop.create_future(), time.perf_counter()
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: StreamProbe(request, marker, finished, started), host, int(port)), deadline)
    except (TimeoutError, OSError):
        return None, None, b""
    try:
        total = await asyncio.wait_for(finished, deadline)
    except TimeoutError:
        transport.close()
        return proto.first, None, proto.tail
    return proto.first, total, proto.tail


FAILURES = {}  # why app streams of section 3 failed: reason -> count


async def burst_app_stream(client):
    first, total, tail = await probe_stream(client.app_url, "/chat/", {"prompt": "go", "stream": True},
                                            {"Authorization": f"Bearer {client.token}"}, b"event: token")
    done = tail.rfind(b"event: done")
    ok = total is not None and done >= 0 and re.search(rb'"status": ?"complete"', tail[done:]) is not None
    if not ok:  # why, for the table's footnote
        code = re.search(rb'"code": ?"([a-z_]+)"', tail)
        status = re.match(rb"HTTP/1.1 (\d+)", tail)
        reason = (code.group(1).decode() if code else f"HTTP {status.group(1).decode()}" if status
                  else "no answer" if not tail else "timeout" if total is None else "cut short")
        FAILURES[reason] = FAILURES.get(reason, 0) + 1
    return first, total, ok


async def burst_direct_stream(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}
    first, total, tail = await probe_stream(client.model_url, "/api/chat", body, {}, b'"done":false')
    return first, total, total is not None and b'"done":true' in tail


# -- 1. added latency per turn ---------------------------------------------------------------------

async def latency(client, cpu, turns, repeats, out):
    await client.script(20, 0)  # 20 tokens at once: the model costs nothing, the app's overhead shows
    for _ in range(20):  # warm up both paths (connections, caches)
        await client.app_turn()
        await client.direct_turn()
        await client.app_stream()
        await client.direct_stream()
    # The usual chat turn is a follow-up: turns in ten conversations started here, taken in turn.
    chats = [(await client.app_turn())[2]["conversation_id"] for _ in range(10)]
    next_chat = itertools.cycle(chats)

    async def next_turn():
        return await client.app_turn("and then?", next(next_chat))
    kinds = {"app": client.app_turn, "direct": client.direct_turn, "next": next_turn, "v1": client.v1_turn}
    medians = {k: [] for k in kinds}
    p99s = {k: [] for k in kinds}
    errors = {k: 0 for k in kinds}
    cpu_used = {k: {} for k in kinds}
    counted = {k: 0 for k in kinds}
    for _ in range(repeats):
        for kind, call in kinds.items():
            before = cpu.snapshot()
            samples = []
            for _ in range(turns):
                took, ok, _ = await call()
                samples.append(took)
                errors[kind] += not ok
            used = Cpu.delta(before, cpu.snapshot())
            for name, seconds in used.items():
                cpu_used[kind][name] = cpu_used[kind].get(name, 0.0) + seconds
            counted[kind] += turns
            medians[kind].append(statistics.median(samples))
            p99s[kind].append(pct(samples, 99))
    ttft = {"app": [], "direct": []}
    streams = {"app": client.app_stream, "direct": client.direct_stream}
    for _ in range(repeats):
        for kind, call in streams.items():
            samples = []
            for _ in range(max(20, turns // 4)):
                first, _, ok = await call()
                errors[kind] += not ok
                if first is not None:
                    samples.append(first)
            ttft[kind].append(statistics.median(samples))
    mm = {k: statistics.median(v) for k, v in medians.items()}
    mp = {k: statistics.median(v) for k, v in p99s.items()}
    mt = {k: statistics.median(v) for k, v in ttft.items()}
    out.append("## 1. Added latency per turn (c=1, PostgreSQL, bearer token)\n")
    out.append(f"{repeats} interleaved repeats of {turns} sequential turns each (app, direct, app in an existing "
               f"conversation, `/v1` with history, then app again…; the existing ones are ten conversations "
               f"taken in turn); "
               f"median over repeats of each repeat's p50 / p99. The model answers 20 tokens at once. "
               f"TTFT: streamed `POST /chat/` (`\"stream\": true`, SSE) vs a streamed `/api/chat` straight to the "
               f"model server, {max(20, turns // 4)} per repeat.\n")
    out.append("| measure | app | direct | added by the app |")
    out.append("| --- | --- | --- | --- |")
    out.append(f"| non-streaming turn p50 (ms) | {ms(mm['app'], 2)} | {ms(mm['direct'], 2)} | "
               f"**{ms(mm['app'] - mm['direct'], 2)}** |")
    out.append(f"| non-streaming turn p99 (ms) | {ms(mp['app'], 2)} | {ms(mp['direct'], 2)} | "
               f"**{ms(mp['app'] - mp['direct'], 2)}** |")
    out.append(f"| p50 per repeat (ms) | {', '.join(ms(v) for v in medians['app'])} | "
               f"{', '.join(ms(v) for v in medians['direct'])} | |")
    out.append(f"| turn in an existing conversation p50 (ms) | {ms(mm['next'], 2)} | {ms(mm['direct'], 2)} | "
               f"**{ms(mm['next'] - mm['direct'], 2)}** |")
    out.append(f"| turn in an existing conversation p99 (ms) | {ms(mp['next'], 2)} | {ms(mp['direct'], 2)} | "
               f"**{ms(mp['next'] - mp['direct'], 2)}** |")
    out.append(f"| `/v1/chat/completions` with a 4-message history p50 (ms) | {ms(mm['v1'], 2)} | "
               f"{ms(mm['direct'], 2)} | **{ms(mm['v1'] - mm['direct'], 2)}** |")
    out.append(f"| streamed TTFT p50 (ms) | {ms(mt['app'], 2)} | {ms(mt['direct'], 2)} | "
               f"**{ms(mt['app'] - mt['direct'], 2)}** |")
    out.append(f"| errors | {errors['app'] + errors['next'] + errors['v1']} | {errors['direct']} | |")
    out.append("")
    out.append("CPU milliseconds per non-streaming turn, by process (user + system from /proc, summed over the "
               "timed blocks; `box` is the whole machine, so `box` minus the rest is other agents' load):\n")
    out.append("| process | app turn | app turn, existing conversation | `/v1` with history | direct turn |")
    out.append("| --- | --- | --- | --- | --- |")
    for name in ("app", "postgres", "model", "client", "box"):
        label = {"app": "app (gunicorn master + workers)", "postgres": "PostgreSQL (all its processes)",
                 "model": "model server", "client": "load tool (this process)",
                 "box": "whole box (all processes, 2 cores)"}[name]
        out.append(f"| {label} | " + " | ".join(f"{cpu_used[kind].get(name, 0) / counted[kind] * 1000:.2f}"
                                                for kind in ("app", "next", "v1", "direct")) + " |")
    out.append("")


# -- 2. throughput at c=16 -------------------------------------------------------------------------

async def throughput(client, database, seconds, repeats, out, concurrency=16):
    await client.script(20, 0)
    results = {"app": [], "direct": []}
    conversation_ids = []

    async def run(kind):
        latencies, errors, stop = [], [0], time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                try:
                    if kind == "app":
                        took, ok, result = await client.app_turn("count me")
                        if ok:
                            conversation_ids.append(result["conversation_id"])
                    else:
                        took, ok, _ = await client.direct_turn("count me")
                except aiohttp.ClientError:
                    took, ok = None, False
                if ok:
                    latencies.append(took)
                else:
                    errors[0] += 1
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        return len(latencies) / wall, pct(latencies, 50), pct(latencies, 99), errors[0], len(latencies)

    for _ in range(repeats):
        for kind in ("direct", "app"):
            results[kind].append(await run(kind))
    # Every answered turn's prompt and answer must be in the database, both complete.
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT role, count(*) FROM messages WHERE conversation_id = ANY(%s) AND status = 'complete' "
            "GROUP BY role", (conversation_ids,)).fetchall()
    counts = dict(rows)
    out.append(f"## 2. Throughput at c={concurrency}\n")
    out.append(f"{concurrency} clients posting turns back to back for {seconds:g} s, {repeats} repeat(s) "
               f"(direct first, then app); median over repeats. Each app turn starts a new conversation.\n")
    out.append("| | turns/s | p50 (ms) | p99 (ms) | errors |")
    out.append("| --- | --- | --- | --- | --- |")
    for kind in ("app", "direct"):
        rs = results[kind]
        out.append(f"| {kind} | **{statistics.median(r[0] for r in rs):.0f}** | "
                   f"{ms(statistics.median(r[1] for r in rs if r[1]))} | "
                   f"{ms(statistics.median(r[2] for r in rs if r[2]))} | {sum(r[3] for r in rs)} |")
    out.append("")
    out.append("Each repeat, turns/s: " + "; ".join(
        f"{kind} " + ", ".join(f"{r[0]:.0f}" for r in results[kind]) for kind in ("app", "direct")) + ".")
    answered = sum(r[4] for r in results["app"])
    ok = counts.get("user", 0) == answered and counts.get("assistant", 0) == answered
    out.append("")
    out.append(f"Database check after the app runs: {answered} turns answered 200; "
               f"{counts.get('user', 0)} prompts and {counts.get('assistant', 0)} answers found complete in "
               f"their conversations — {'**all there**' if ok else '**MISSING ROWS**'}.\n")


# -- 3. many concurrent streams --------------------------------------------------------------------

async def streams(client, app, cpu, database_admin, database_name, sizes, out):
    await client.script(100, 0.02)
    rows = []
    for n in sizes:
        await client.model_stats()
        await client.script(100, 0.02)  # resets the model server's tick-lateness record
        before = cpu.snapshot()
        direct = await asyncio.gather(*(burst_direct_stream(client) for _ in range(n)))
        direct_cpu = Cpu.delta(before, cpu.snapshot())
        direct_stats = await client.model_stats()
        await asyncio.sleep(1)
        base_rss = sum(p.memory_info().rss for p in app.workers())
        peak = {"conns": 0, "rss": base_rss}
        running = [True]

        async def sample(peak=peak, running=running):  # bound now: the loop makes new ones per size
            async with await psycopg.AsyncConnection.connect(database_admin, autocommit=True) as conn:
                while running[0]:
                    row = await (await conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        (database_name,))).fetchone()
                    peak["conns"] = max(peak["conns"], row[0])
                    try:
                        peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in app.workers()))
                    except psutil.NoSuchProcess:
                        pass
                    await asyncio.sleep(0.1)
        sampler = asyncio.create_task(sample())
        await client.script(100, 0.02)
        started, before = time.perf_counter(), cpu.snapshot()
        through_app = await asyncio.gather(*(burst_app_stream(client) for _ in range(n)))
        wall = time.perf_counter() - started
        app_cpu = Cpu.delta(before, cpu.snapshot())
        app_stats = await client.model_stats()
        running[0] = False
        await sampler
        rows.append((n, direct, through_app, wall, peak, base_rss, direct_stats, app_stats, direct_cpu, app_cpu,
                     dict(FAILURES)))
        FAILURES.clear()
        await asyncio.sleep(2)
    out.append("## 3. Concurrent API streams (100 tokens, 20 ms apart = 2 s at the model)\n")
    out.append("All N streams start at once; first the same N straight from the model server (`direct`), "
               "then N streamed `POST /chat/` through the app. TTFT = time to the first token event; whole = "
               "time to the end of the response. Peak DB connections: `pg_stat_activity` of the app's database "
               "sampled every 0.1 s. Memory per open stream: (peak − idle) RSS of the app workers / N. Model "
               "server pacing: p99 / max lateness of its 5 ms ticks during the run. Each stream is its own connection "
               "(`Connection: close`), read by a minimal asyncio protocol in the bench process. CPU-s: CPU seconds "
               "each process group used during the run (box = the whole machine, other agents included).\n")
    out.append("| streams | path | completed | TTFT p50 (s) | TTFT p95 (s) | whole p50 (s) | whole p95 (s) | "
               "peak DB conns | RSS / stream | model tick late p99 / max (ms) | "
               "CPU-s app / pg / model / client / box |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, direct, through_app, _wall, peak, base_rss, dstats, astats, dcpu, acpu, _failures in rows:
        for label, results, stats, used in (("direct", direct, dstats, dcpu), ("app", through_app, astats, acpu)):
            firsts = [r[0] for r in results if r[0] is not None]
            totals = [r[1] for r in results if r[1] is not None and r[2]]
            done = sum(1 for r in results if r[2])
            extra = (f"{peak['conns']} | {(peak['rss'] - base_rss) / n / 1024:.0f} KiB" if label == "app"
                     else "– | –")
            spent = " / ".join(f"{used.get(k, 0):.1f}" for k in ("app", "postgres", "model", "client", "box"))
            out.append(f"| {n} | {label} | {done}/{n} | {fmt_s(pct(firsts, 50))} | **{fmt_s(pct(firsts, 95))}** | "
                       f"{fmt_s(pct(totals, 50))} | **{fmt_s(pct(totals, 95))}** | {extra} | "
                       f"{stats['tick_late_p99_ms']:.1f} / {stats['tick_late_max_ms']:.1f} | {spent} |")
    out.append("")
    for n, *_, failures in rows:
        if failures:
            out.append(f"App streams that failed at {n}: " + ", ".join(f"{k} × {v}" for k, v in failures.items())
                       + " (the error code of the stream's `error` event, else the HTTP status or what happened).")
    out.append("")


def fmt_s(value):
    return "–" if value is None else f"{value:.2f}"


# -- 4. cross-worker follow latency ----------------------------------------------------------------

async def follow(client, second_url, count, out):
    await client.script(100, 0.02)
    delays, replayed, completed = [], 0, 0

    async def one():
        nonlocal replayed, completed
        a_events, b_events, started_b = [], [], [None]
        ready = asyncio.Event()
        ids = {}

        async def generating():
            parser, offset = Sse(), 0
            async with client.session.post(client.app_url + "/chat/", data=json.dumps({"prompt": "go", "stream": True}),
                                           headers=client.auth()) as r:
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    for name, data in parser.feed(chunk):
                        if name == "start":
                            ids.update(data)
                            ready.set()
                        elif name == "token":
                            offset += len(data["text"])
                            a_events.append((offset, now))

        async def follower():
            await ready.wait()
            parser, offset = Sse(), 0
            url = (f"{second_url}/conversations/{ids['conversation_id']}/messages/{ids['message_id']}/stream")
            async with client.session.get(url, headers=client.auth()) as r:
                started_b[0] = time.perf_counter()
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    for name, data in parser.feed(chunk):
                        if name == "token":
                            offset += len(data["text"])
                            b_events.append((offset, now))
                        elif name == "done":
                            return True
            return False

        _, ok = await asyncio.gather(generating(), follower())
        completed += bool(ok)
        # Only tokens the generating stream got after the follower was connected (plus 0.2 s of
        # replay) count: earlier ones were replayed, not followed.
        for offset, t_a in a_events:
            if t_a < started_b[0] + 0.2:
                replayed += 1
                continue
            t_b = next((t for o, t in b_events if o >= offset), None)
            if t_b is not None:
                delays.append(t_b - t_a)

    for start in range(0, count, 4):  # four pairs at a time
        await asyncio.gather(*(one() for _ in range(min(4, count - start))))
    out.append("## 4. Cross-worker follow latency\n")
    out.append(f"{count} streamed answers (100 tokens, 20 ms apart) generated on instance A (2 workers); each "
               "is followed from instance B (a second gunicorn, 1 worker, same database) via "
               "`GET /conversations/<id>/messages/<mid>/stream`. Delay = when a character offset reached the "
               "follower minus when it reached the generating stream's client.\n")
    out.append("| followed tokens | follower p50 (ms) | follower p95 (ms) | max (ms) | followers completed |")
    out.append("| --- | --- | --- | --- | --- |")
    out.append(f"| {len(delays)} | {ms(pct(delays, 50), 0)} | **{ms(pct(delays, 95), 0)}** | "
               f"{ms(max(delays) if delays else None, 0)} | {completed}/{count} |")
    out.append("")


# -- 5. history at scale ----------------------------------------------------------------------------

def seed_history(database, user_id, conversations, per_conversation, log):
    """COPY conversations and messages in bulk (indexes dropped during the load, rebuilt after)."""
    rng = random.Random(7)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(997)]
    rare_chat = conversations // 2
    base = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    started = time.perf_counter()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        indexes = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'messages' AND "
                               "indexname NOT IN (SELECT conname FROM pg_constraint)").fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        first_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM conversations").fetchone()[0]
        with conn.cursor().copy("COPY conversations (id, user_id, title, model, system_prompt, message_count, "
                                "created_at, updated_at) FROM STDIN") as copy:
            for n in range(conversations):
                stamp = base + datetime.timedelta(minutes=n)
                copy.write_row((first_id + n, user_id, f"chat {n} about {rng.choice(WORDS)}", MODEL, "",
                                per_conversation, stamp, stamp))
        conn.execute("SELECT setval(pg_get_serial_sequence('conversations', 'id'), %s)",
                     (first_id + conversations,))
        k = 0
        with conn.cursor().copy("COPY messages (conversation_id, role, content, status, model, cancel_requested, "
                                "created_at, heartbeat_at) FROM STDIN") as copy:
            for n in range(conversations):
                stamp = base + datetime.timedelta(minutes=n)
                for m in range(per_conversation):
                    k += 1
                    content = texts[k % len(texts)]
                    if n == rare_chat and m == per_conversation - 1:
                        content += " zebra"
                    copy.write_row((first_id + n, "user" if m % 2 == 0 else "assistant", content, "complete",
                                    None if m % 2 == 0 else MODEL, False, stamp, stamp))
        loaded = time.perf_counter() - started
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("ANALYZE")
    log(f"seeded {conversations} x {per_conversation} messages: COPY {loaded:.0f} s, "
        f"indexes + ANALYZE {time.perf_counter() - started - loaded:.0f} s")
    return list(range(first_id, first_id + conversations))


async def history(client, database, user_id, token, conversations, per_conversation, samples, out, log):
    started = time.perf_counter()
    ids = seed_history(database, user_id, conversations, per_conversation, log)
    seeded = time.perf_counter() - started
    await client.script(20, 0)
    rng = random.Random(11)
    headers = client.auth(token)
    results = {}

    async def get(url, first_byte=False):
        t0 = time.perf_counter()
        async with client.session.get(client.app_url + url, headers=headers) as r:
            if first_byte:
                await r.content.readany()
                took = time.perf_counter() - t0
                await r.read()
            else:
                body = await r.read()
                took = time.perf_counter() - t0
            if r.status != 200:
                raise RuntimeError(f"{url}: {r.status} {body[:200] if not first_byte else ''}")
            return took, (None if first_byte else body)

    async def measure(name, make_call):
        values = []
        for _ in range(3):
            await make_call()  # warm-up
        for _ in range(samples):
            values.append(await make_call())
        results[name] = values

    async def sidebar():
        return (await get("/conversations?limit=30"))[0]

    async def page():
        return (await get(f"/conversations/{rng.choice(ids)}?limit={limit}"))[0]

    cursors, limit = {}, min(50, per_conversation // 2)  # 50 (the API's default) unless chats are short
    for cid in rng.sample(ids, min(len(ids), 50)):
        _, body = await get(f"/conversations/{cid}?limit={limit}")
        cursors[cid] = json.loads(body)["older_cursor"]

    async def older():
        cid = rng.choice(list(cursors))
        return (await get(f"/conversations/{cid}?limit={limit}&before={cursors[cid]}"))[0]

    async def export():
        return (await get(f"/conversations/{rng.choice(ids)}/export", first_byte=True))[0]

    turn_targets = iter(rng.sample(ids, min(len(ids), samples + 10)))

    async def turn():
        took, ok, _ = await client.app_turn("and one more", next(turn_targets), token)
        if not ok:
            raise RuntimeError("a turn in a big history failed")
        return took

    async def rare():
        return (await get("/conversations?limit=30&q=zebra"))[0]

    async def everywhere():
        return (await get("/conversations?limit=30&q=replica"))[0]

    for name, call in (("sidebar (`GET /conversations?limit=30`)", sidebar),
                       (f"conversation page (`GET /conversations/<id>`, {limit} newest)", page),
                       ("older-messages page (`?before=<cursor>`)", older),
                       ("export, time to first byte", export),
                       (f"a turn in a {per_conversation}-message chat (`POST /chat/`, non-streaming)", turn),
                       ("search, a word in one chat (`q=zebra`)", rare),
                       ("search, a word in every chat (`q=replica`)", everywhere)):
        await measure(name, call)
    out.append("## 5. History at scale\n")
    out.append(f"One user with {conversations:,} conversations × {per_conversation} messages "
               f"({conversations * per_conversation:,} rows, ~180 characters each, bulk-loaded with COPY in "
               f"{seeded:.0f} s, then ANALYZE). {samples} sequential requests each after 3 warm-ups.\n")
    out.append("| request | p50 (ms) | p99 (ms) |")
    out.append("| --- | --- | --- |")
    for name, values in results.items():
        out.append(f"| {name} | {ms(pct(values, 50))} | **{ms(pct(values, 99))}** |")
    out.append("")


# -- main ----------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~3 minutes")
    parser.add_argument("--only", default="1,2,3,4,5", help="sections to run, e.g. 1,2")
    parser.add_argument("--streams", help="comma-separated stream counts (default 64,256 quick; 64,256,1000 full)")
    parser.add_argument("--history", help="CONVERSATIONSxMESSAGES (default 500x40 quick; 10000x100 full)")
    parser.add_argument("--turns", type=int, help="turns per block in section 1 (default 100 quick, 200 full)")
    parser.add_argument("--env", action="append", default=[], help="extra app environment NAME=VALUE")
    parser.add_argument("--nice", type=int, default=-5,
                        help="priority of the bench's client and model server (default -5; 0 = leave as is)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-latest.md"))
    args = parser.parse_args()
    quick = args.quick
    only = set(args.only.split(","))
    sizes = [int(s) for s in (args.streams or ("64,256" if quick else "64,256,1000")).split(",")]
    history_size = args.history or ("500x40" if quick else "10000x100")
    conversations, per_conversation = (int(x) for x in history_size.split("x"))
    extra_env = dict(item.split("=", 1) for item in args.env)

    global PRIORITY
    PRIORITY = args.nice

    def interrupted(*_):  # a stopped bench still stops its servers and drops its database (finally below)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it (gunicorn, model server)

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    database = TestDatabase()
    plain = database.url.replace("postgresql+psycopg://", "postgresql://")
    model = app = second = None
    out, failed = [], True
    try:
        log("migrating (flask db upgrade) and creating users")
        flask(database.url, "db", "upgrade")
        for name in ("bench", "history"):
            flask(database.url, "create-user", name, stdin=f"{PASSWORD}\n{PASSWORD}\n")
        with psycopg.connect(plain) as conn:
            history_user = conn.execute("SELECT id FROM users WHERE username = 'history'").fetchone()[0]
            postmaster = psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0]).parent()
        model = ModelServer().start()
        boost(os.getpid())  # after the servers' Popen: the app must not inherit the boost
        app = App(database.url, model.url, 2, extra_env).start()
        load = (f"import importlib; c = importlib.import_module({GUNICORN_CONFIG[7:]!r}).__dict__"
                if GUNICORN_CONFIG.startswith("python:") else f"import runpy; c = runpy.run_path({GUNICORN_CONFIG!r})")
        worker_class = subprocess.run(
            [PY, "-c", load + "; print(c['worker_class'], 'threads', c.get('threads', 1), "
                              "'worker_connections', c.get('worker_connections', '-'))"],
            cwd=ROOT, capture_output=True, text=True, env=app.env).stdout.strip()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        me = psutil.Process()
        cpu = Cpu({"app": app.processes, "postgres": lambda: [postmaster] + postmaster.children(),
                   "model": lambda: [psutil.Process(model.process.pid)], "client": lambda: [me]})
        box_before = cpu.snapshot()
        wall_before = time.perf_counter()

        async def run_all():
            async with Client(app.url, model.url) as client:
                client.token = await client.login("bench")
                if "1" in only:
                    log("1. latency per turn")
                    await latency(client, cpu, args.turns or (100 if quick else 200), 5 if quick else 7, out)
                if "2" in only:
                    log("2. throughput at c=16")
                    await throughput(client, plain, 5 if quick else 15, 1 if quick else 3, out)
                if "3" in only:
                    log(f"3. streams {sizes}")
                    await streams(client, app, cpu, database.admin_url, database.name, sizes, out)
                if "4" in only:
                    nonlocal second
                    log("4. cross-worker follow")
                    second = App(database.url, model.url, 1, extra_env).start()
                    await follow(client, second.url, 8 if quick else 40, out)
                    second.stop()
                    second = None
                if "5" in only:
                    log(f"5. history {conversations}x{per_conversation}")
                    token = await client.login("history")
                    await history(client, plain, history_user, token, conversations, per_conversation,
                                  30 if quick else 200, out, log)

        try:
            import uvloop  # libuv's event loop: the client keeps up with 1,000 streams on a busy box
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(run_all())
        failed = False
        used = Cpu.delta(box_before, cpu.snapshot())
        wall = time.perf_counter() - wall_before
    finally:
        for process in (second, app, model):
            if process is not None:
                process.stop(keep_log=failed)
        database.drop()
    ours = sum(v for k, v in used.items() if k != "box")
    head = [f"# Benchmark: app vs the model server it fronts ({'quick' if quick else 'full'} mode)\n",
            f"Commit `{commit}`, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
            f"gunicorn `-c {GUNICORN_CONFIG}` (the Dockerfile's), worker class `{worker_class}`, "
            "WEB_CONCURRENCY=2, PostgreSQL "
            f"(throwaway cluster unless TEST_DATABASE_URL), {psutil.cpu_count()} cores. "
            f"Box load: load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; during the "
            f"{wall:.0f} s of measurements the box used {used['box']:.0f} CPU-s, the bench's own processes "
            f"{ours:.0f} CPU-s, so other work on the box took ~{max(0, used['box'] - ours) / wall:.2f} cores "
            f"on average. Command: `{' '.join(['bench/run.py'] + sys.argv[1:])}`.\n"]
    text = "\n".join(head + out)
    print(text)
    Path(args.out).write_text(text)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
