"""The app served for real: gunicorn in a subprocess on a free port, as in production.

Streaming tests go through real HTTP so that client disconnects, worker processes and
cross-process Stop behave as they do in production.
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, database_url, ollama_url, workers=1, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": database_url, "OLLAMA_URL": ollama_url,
                    "SECRET_KEY": os.environ["SECRET_KEY"], "PORT": str(self.port),
                    "WEB_CONCURRENCY": str(workers), "LOG_LEVEL": "INFO",
                    "DEFAULT_MODEL": "tinyllama", "LLM_CONNECT_TIMEOUT": "1", "LLM_READ_TIMEOUT": "2",
                    "OLLAMA_LOAD_TIMEOUT": "2", "STREAM_FLUSH_SECONDS": "0.05", "HEARTBEAT_SECONDS": "0.2",
                    "STALE_AFTER_SECONDS": "1.5", "MODELS_CACHE_SECONDS": "0",
                    **{k: str(v) for k, v in env.items()}}
        self.process = None

    def start(self):
        self.log = open(f"/tmp/live-server-{self.port}.log", "w")
        from webapp.launch import gunicorn_command  # exactly what `make run` starts
        self.process = subprocess.Popen(
            gunicorn_command() + ["--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                requests.get(self.url + "/health", timeout=2)
                return self
            except (requests.ConnectionError, requests.Timeout):  # a worker still booting on a busy machine
                time.sleep(0.1)
        self.kill()  # never leave a half-started server behind
        raise RuntimeError("server did not start in time")

    def kill(self):
        """SIGKILL the whole process group: a crash, not a graceful stop."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_text(self):
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def sse_events(response):
    """Parse a text/event-stream response into (event, data) pairs as they arrive."""
    name, data = None, []
    for raw in response.iter_lines(chunk_size=None, decode_unicode=False):
        line = raw.decode("utf-8")
        if line == "":
            if data:
                yield name or "message", json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def login(base_url, username, password):
    response = requests.post(base_url + "/auth/login", data={"username": username, "password": password},
                             timeout=10)
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}
