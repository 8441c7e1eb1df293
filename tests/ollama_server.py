"""A scripted Ollama for tests: the real wire protocol over real HTTP on a free loopback port.

Speaks Ollama's native API (`/`, `/api/version`, `/api/tags`, `/api/show`, `/api/chat` as NDJSON) and
the OpenAI-compatible one (`/v1/models`, `/v1/chat/completions` as SSE), as summed up in
shared/OLLAMA-PROTOCOL.md. Tests script the next answers: text, pace, and failures (an error status,
an error line mid-stream, a stall, a cut connection, a slow model load). It records every request
and notices when a client closes its connection, which is how tests see that Stop reached it.
"""
import json
import re
import select
import socket
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(handler, attribute, owner):
    """Serve `handler` (given `owner` as a class attribute) on a free loopback port, in a thread."""
    bound = type(handler.__name__, (handler,), {attribute: owner})
    server = _QuietServer(("127.0.0.1", 0), bound)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEFAULT_SCRIPT = dict(reply="Hello from the fake model.", chunks=None, delay=0.0, fail=None, fail_after=0,
                      status=500, error="an error was encountered while running the model", stall=0.0,
                      done_reason="stop", prompt_eval_count=None, eval_count=None)


class ClientGone(Exception):
    pass


class FakeOllama:
    def __init__(self, models=("tinyllama:latest", "llama3.2:latest")):
        self.models = list(models)
        self.url = None
        self._server = None
        self._lock = threading.Lock()
        self._active = 0
        self.reset()

    # -- control -------------------------------------------------------------------------------

    def start(self):
        self._server, self.url = serve(_Handler, "server_state", self)
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def reset(self):
        self._script = dict(DEFAULT_SCRIPT)
        self.connections = 0  # TCP connections accepted since the last reset (keep-alive reuses one)
        self.peak_streams = 0  # the most chat streams answered at once since the last reset
        self.requests = []
        self.events = []
        self._event_added = threading.Condition()

    def script(self, reply=DEFAULT_SCRIPT["reply"], **kwargs):
        unknown = set(kwargs) - set(DEFAULT_SCRIPT)
        if unknown:
            raise TypeError(f"unknown script options: {unknown}")
        self._script = {**DEFAULT_SCRIPT, "reply": reply, **kwargs}

    @property
    def chat_requests(self):
        return [r["json"] for r in self.requests if r["path"] in ("/api/chat", "/v1/chat/completions")]

    def record(self, name, **data):
        with self._event_added:
            self.events.append((name, time.monotonic(), data))
            self._event_added.notify_all()

    def wait_for_event(self, name, timeout=5.0):
        def found():
            return next((e for e in self.events if e[0] == name), None)
        with self._event_added:
            self._event_added.wait_for(found, timeout)
            return found()

    def active_streams(self):
        """Chat streams being answered right now (capacity tests check they really were open at once)."""
        return self._active

    def resolve(self, name):
        """Ollama adds ':latest' to a name without a tag."""
        if not isinstance(name, str) or not name:
            return None
        full = name if ":" in name else name + ":latest"
        return full if full in self.models else None

    def chunks_for(self, script):
        if script["chunks"] is not None:
            return list(script["chunks"])
        return re.findall(r"\S+\s*|\s+", script["reply"])


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 256  # many streams may connect at once (benchmarks); Go's backlog is large too
    def handle_error(self, request, client_address):
        pass  # clients that hang up mid-answer are part of the tests, not errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: FakeOllama = None

    def log_message(self, *args):  # keep test output clean
        pass

    def setup(self):
        super().setup()
        with self.server_state._lock:
            self.server_state.connections += 1

    # -- plumbing --------------------------------------------------------------------------------

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, body):
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.server_state.requests.append({"method": self.command, "path": self.path, "json": parsed,
                                           "headers": dict(self.headers)})
        return parsed

    def _send(self, status, payload, content_type="application/json"):
        data = payload if isinstance(payload, bytes) else (
            json.dumps(payload).encode() if content_type == "application/json" else payload.encode())
        self.send_response(status)
        self.send_header("Content-Type", content_type + ("; charset=utf-8" if "json" not in content_type else ""))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _start_stream(self, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, text):
        data = text.encode("utf-8")
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise ClientGone() from None

    def _end_stream(self):
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise ClientGone() from None

    def _client_closed(self):
        """True when the client has closed its side (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def _sleep(self, seconds):
        """Sleep, checking every 50 ms whether the client went away."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._client_closed():
                raise ClientGone()
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    # -- routes ----------------------------------------------------------------------------------

    def do_HEAD(self):
        if self.path == "/":
            self._send(200, "Ollama is running", "text/plain")
        else:
            self._send(404, "404 page not found", "text/plain")

    def do_GET(self):
        self._record(b"")
        fake = self.server_state
        if self.path == "/":
            self._send(200, "Ollama is running", "text/plain")
        elif self.path == "/api/version":
            self._send(200, {"version": "0.33.0"})
        elif self.path == "/api/tags":
            self._send(200, {"models": [_tag(name) for name in fake.models]})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 1700000000, "owned_by": "library"}
                for name in fake.models]})
        else:
            self._send(404, "404 page not found", "text/plain")

    def do_POST(self):
        body = self._body()
        parsed = self._record(body)
        routes = {"/api/chat": self._chat, "/api/show": self._show, "/v1/chat/completions": self._openai_chat}
        route = routes.get(self.path)
        if route is None:
            self._send(404, "404 page not found", "text/plain")
            return
        if not body:
            self._error(400, "missing request body")
            return
        if parsed is None or not isinstance(parsed, dict):
            self._error(400, "invalid character 'x' looking for beginning of value")
            return
        route(parsed)

    def _error(self, status, message):
        if self.path.startswith("/v1/"):
            kind = {404: "not_found_error", 400: "invalid_request_error"}.get(status, "api_error")
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})
        else:
            self._send(status, {"error": message})

    def _show(self, request):
        name = request.get("model") or request.get("name")
        if self.server_state.resolve(name) is None:
            self._error(404, f"model '{name}' not found")
            return
        self._send(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                         "details": _tag(self.server_state.resolve(name))["details"]})

    # -- chat: shared scripting -----------------------------------------------------------------

    def _prepare(self, request, limit_key):
        """Validate, apply pre-stream failures; return (script, chunks, cut_reason) or None if answered."""
        fake = self.server_state
        script = dict(fake._script)
        if not request.get("model"):
            self._error(400, "model is required")
            return None
        if fake.resolve(request["model"]) is None:
            self._error(404, f"model '{request['model']}' not found")
            return None
        if script["fail"] == "headers_stall":
            try:
                self._sleep(script["stall"])
            except ClientGone:
                fake.record("client_closed", chunks_sent=0)
                return None
        if script["fail"] == "status":
            self._error(script["status"], script["error"])
            return None
        chunks = fake.chunks_for(script)
        limit = request.get(limit_key) if limit_key == "max_tokens" else (request.get("options") or {}).get(
            "num_predict")
        reason = script["done_reason"]
        if isinstance(limit, int) and 0 <= limit < len(chunks):
            chunks, reason = chunks[:limit], "length"
        return script, chunks, reason

    def _run_stream(self, script, chunks, write_chunk, write_error):
        """Write chunks with the scripted pace and failure; returns False if the stream ended early."""
        fake = self.server_state
        sent = 0
        try:
            for index, text in enumerate(chunks):
                if index == script["fail_after"] and script["fail"] in ("midstream", "stall", "cut"):
                    if script["fail"] == "midstream":
                        write_error(script["error"])
                        self._end_stream()
                        return False
                    if script["fail"] == "cut":
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return False
                    self._sleep(script["stall"])
                if script["delay"]:
                    self._sleep(script["delay"])
                write_chunk(text)
                sent += 1
            return True
        except ClientGone:
            fake.record("client_closed", chunks_sent=sent)
            self.close_connection = True
            return False

    @contextmanager
    def _streaming(self, content_type, model):
        """Start a chunked 200 answer and record it (and a client that hangs up) as events."""
        fake = self.server_state
        fake.record("chat_start", model=model)
        with fake._lock:
            fake._active += 1
            fake.peak_streams = max(fake.peak_streams, fake._active)
        try:
            self._start_stream(content_type)
            yield
        except ClientGone:
            fake.record("client_closed", chunks_sent=-1)
        finally:
            with fake._lock:
                fake._active -= 1

    # -- /api/chat --------------------------------------------------------------------------------

    def _chat(self, request):
        fake = self.server_state
        model = request.get("model")
        if model and fake.resolve(model) and not request.get("messages"):
            self._send(200, {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
            return
        prepared = self._prepare(request, "num_predict")
        if prepared is None:
            return
        script, chunks, reason = prepared
        final = _final_counters(request, script, chunks)
        if request.get("stream", True) is False:
            if script["fail"] in ("midstream", "cut"):
                self._error(500, script["error"])
                return
            self._send(200, {"model": model, "created_at": _now(),
                             "message": {"role": "assistant", "content": "".join(chunks)},
                             "done": True, "done_reason": reason, **final})
            return
        with self._streaming("application/x-ndjson", model):

            def line(payload):
                self._write_chunk(json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n")

            def write_chunk(text):
                line({"model": model, "created_at": _now(), "message": {"role": "assistant", "content": text},
                      "done": False})

            if self._run_stream(script, chunks, write_chunk, lambda error: line({"error": error})):
                line({"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                      "done": True, "done_reason": reason, **final})
                self._end_stream()
                fake.record("chat_done")

    # -- /v1/chat/completions --------------------------------------------------------------------

    def _openai_chat(self, request):
        fake = self.server_state
        model = request.get("model")
        prepared = self._prepare(request, "max_tokens")
        if prepared is None:
            return
        script, chunks, reason = prepared
        final = _final_counters(request, script, chunks)
        usage = {"prompt_tokens": final["prompt_eval_count"], "completion_tokens": final["eval_count"],
                 "total_tokens": final["prompt_eval_count"] + final["eval_count"]}
        base = {"id": "chatcmpl-123", "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama"}
        if not request.get("stream", False):
            self._send(200, {**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(chunks)},
                "finish_reason": reason}], "usage": usage})
            return
        with self._streaming("text/event-stream", model):

            def frame(payload):
                self._write_chunk("data: " + (payload if isinstance(payload, str) else json.dumps(
                    payload, separators=(",", ":"), ensure_ascii=False)) + "\n\n")

            def chunk(delta, finish=None):
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            def write_chunk(text):
                frame(chunk({"role": "assistant", "content": text}))

            def write_error(error):
                frame({"error": {"message": error, "type": "api_error", "param": None, "code": None}})

            if self._run_stream(script, chunks, write_chunk, write_error):
                frame(chunk({}, reason))
                if (request.get("stream_options") or {}).get("include_usage"):
                    frame({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                frame("[DONE]")
                self._end_stream()
                fake.record("chat_done")


def _final_counters(request, script, chunks):
    words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages") or [])
    eval_count = script["eval_count"] if script["eval_count"] is not None else len(chunks)
    return {"total_duration": 4_883_583_458, "load_duration": 1_334_875,
            "prompt_eval_count": script["prompt_eval_count"] if script["prompt_eval_count"] is not None
            else max(1, words),
            "prompt_eval_duration": 342_546_000, "eval_count": eval_count,
            "eval_duration": max(1, eval_count) * 50_000_000}


def _now():
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _tag(name):
    family = name.split(":")[0].rstrip("0123456789.") or "llama"
    return {"name": name, "model": name, "modified_at": "2026-11-01T10:00:00.000000Z", "size": 2019393189,
            "digest": "a" * 64, "details": {"parent_model": "", "format": "gguf", "family": family,
                                            "families": [family], "parameter_size": "3.2B",
                                            "quantization_level": "Q4_K_M"}}
