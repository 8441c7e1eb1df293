"""An Ollama-protocol adapter over the real tiny model, for tests.

Serves `/api/tags`, `/api/version` and streaming `/api/chat` (NDJSON, Ollama's field names and
nanosecond counters) from SmolLM2-135M-Instruct running in-process through llama-cpp-python. So the
Ollama client is tested against a real model's tokens too, not only scripted ones.

To prove that multi-byte UTF-8 survives arbitrary network boundaries, every NDJSON line is written
as two HTTP chunks; a line holding a Cyrillic letter or an emoji is cut inside that character, so
the client receives half a character in one read and the rest in the next.
"""
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

from webapp.local_llm import ALIAS, gguf_path  # noqa: E402

from ollama_server import serve

MODEL_NAME = ALIAS + ":latest"


class TinyOllama:
    def __init__(self):
        from llama_cpp import Llama
        self.llama = Llama(model_path=str(gguf_path()), n_ctx=2048, verbose=False)
        self.lock = threading.Lock()  # one generation at a time: a Llama object is not thread-safe
        self.split_lines = 0          # lines sent cut inside a multi-byte character
        self.url = None
        self._server = None

    def start(self):
        self._server, self.url = serve(_Handler, "owner", self)
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: TinyOllama = None

    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/api/version":
            self._json(200, {"version": "0.33.0"})
        elif self.path == "/api/tags":
            self._json(200, {"models": [{"name": MODEL_NAME, "model": MODEL_NAME, "size": 0,
                                         "details": {"family": "llama", "parameter_size": "135M"}}]})
        else:
            self._json(404, {"error": "404 page not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != "/api/chat":
            self._json(404, {"error": "404 page not found"})
        elif body.get("model") not in (ALIAS, MODEL_NAME):
            self._json(404, {"error": f"model '{body.get('model')}' not found"})
        else:
            with self.owner.lock:
                self._chat(body)

    def _chat(self, body):
        options = body.get("options") or {}
        started = time.monotonic_ns()
        stream = self.owner.llama.create_chat_completion(
            body["messages"], stream=True, max_tokens=options.get("num_predict", 128),
            temperature=options.get("temperature", 0.0), seed=options.get("seed", 1))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        count, reason, first = 0, "stop", None
        for chunk in stream:
            choice = chunk["choices"][0]
            text = choice["delta"].get("content")
            if text:
                count += 1
                first = first or time.monotonic_ns()
                self._line({"model": MODEL_NAME, "created_at": _now(),
                            "message": {"role": "assistant", "content": text}, "done": False})
            reason = choice.get("finish_reason") or reason
        now = time.monotonic_ns()
        self._line({"model": MODEL_NAME, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": reason, "total_duration": now - started, "load_duration": 0,
                    "prompt_eval_count": 1, "prompt_eval_duration": (first or now) - started,
                    "eval_count": count, "eval_duration": max(1, now - (first or now))})
        self.wfile.write(b"0\r\n\r\n")

    def _line(self, payload):
        data = (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        cut = _inside_a_character(data)
        if cut is None:
            cut = len(data) // 2
        else:
            self.owner.split_lines += 1
        for part in (data[:cut], data[cut:]):
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.flush()


def _inside_a_character(data):
    """The index of the first UTF-8 continuation byte: cutting there splits a character in two."""
    return next((i for i, byte in enumerate(data) if byte & 0xC0 == 0x80), None)


def _now():
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
