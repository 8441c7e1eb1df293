"""An Ollama-protocol model server for benchmarks: plain asyncio, one process, holds its pacing
at thousands of open streams.

The test server (tests/ollama_server.py) runs one OS thread per stream and sleeps per token, which is
right for scripting failures but cannot pace 1,000 streams on two cores. This one keeps every open
stream in a timing wheel: one timer every TICK seconds writes the next token line to each stream
that is due, so 1,000 streams of one token per 20 ms cost 200 wake-ups a second, not 50,000.

It speaks what the app uses (shared/OLLAMA-PROTOCOL.md): `GET /`, `HEAD /`, `/api/version`,
`/api/tags`, `/api/show`, `/v1/models`, and `POST /api/chat` (NDJSON stream with a final
`done:true` line carrying counters, or one JSON object for `stream:false`). HTTP/1.1 keep-alive.

The answer is set for all requests by `POST /_bench/script` `{"tokens": N, "gap": seconds}`
(gap 0 = all tokens in one write, at once). `GET /_bench/stats` reports open streams and how late
the ticks ran (the proof that the server kept its pacing).

    python bench/model_server.py PORT
"""
import asyncio
import json
import sys

TICK = 0.005
MODELS = ["tinyllama:latest", "llama3.2:latest"]
STAMP = "2026-11-27T06:00:00.000000Z"


def _tag(name):
    return {"name": name, "model": name, "modified_at": "2026-11-01T10:00:00.000000Z", "size": 2019393189,
            "digest": "a" * 64, "details": {"parent_model": "", "format": "gguf", "family": "llama",
                                            "families": ["llama"], "parameter_size": "3.2B",
                                            "quantization_level": "Q4_K_M"}}


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


class State:
    def __init__(self):
        self.tokens = 20
        self.gap = 0.0
        self.text = "tok "
        self.wheel = {}          # tick number -> list of streams due then
        self.t0 = None
        self.tick_no = 0
        self.lateness = []       # seconds each tick ran late (bounded window)
        self.max_late = 0.0
        self.open = 0
        self.peak_open = 0
        self.served = 0

    def token_line(self, model):
        return _chunk(json.dumps({"model": model, "created_at": STAMP, "message": {
            "role": "assistant", "content": self.text}, "done": False}, separators=(",", ":")).encode() + b"\n")

    def final_line(self, model, prompt_words, count):
        return _chunk(json.dumps({"model": model, "created_at": STAMP, "message": {
            "role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
            "total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": max(1, prompt_words),
            "prompt_eval_duration": 342546000, "eval_count": count, "eval_duration": count * 20_000_000},
            separators=(",", ":")).encode() + b"\n") + b"0\r\n\r\n"


STATE = State()
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
        b"Date: Fri, 27 Nov 2026 06:00:00 GMT\r\n\r\n")


class Stream:
    __slots__ = ("proto", "left", "token", "final", "started")

    def __init__(self, proto, left, token, final):
        self.proto, self.left, self.token, self.final, self.started = proto, left, token, final, False


def schedule(stream, ticks_ahead):
    due = STATE.tick_no + ticks_ahead
    STATE.wheel.setdefault(due, []).append(stream)


def tick(loop):
    now = loop.time()
    # Run every tick that is due (if the loop fell behind, catch up rather than drift).
    while STATE.t0 + (STATE.tick_no + 1) * TICK <= now:
        STATE.tick_no += 1
        late = now - (STATE.t0 + STATE.tick_no * TICK)
        STATE.lateness.append(late)
        if len(STATE.lateness) > 20000:
            del STATE.lateness[:10000]
        STATE.max_late = max(STATE.max_late, late)
        due = STATE.wheel.pop(STATE.tick_no, None)
        if not due:
            continue
        gap_ticks = max(1, round(STATE.gap / TICK))
        for stream in due:
            proto = stream.proto
            if proto.transport is None or proto.transport.is_closing():
                continue
            out = stream.token if stream.started else HEAD + stream.token
            stream.started = True
            stream.left -= 1
            if stream.left <= 0:
                proto.transport.write(out + stream.final)
                proto.stream_done()
            else:
                proto.transport.write(out)
                schedule(stream, gap_ticks)
    loop.call_at(STATE.t0 + (STATE.tick_no + 1) * TICK, tick, loop)


class Http(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.buf = b""
        self.streaming = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if self.streaming:
            self.stream_done()
        self.transport = None

    def stream_done(self):
        if self.streaming:
            self.streaming = False
            STATE.open -= 1
            STATE.served += 1
            if self.buf:
                self.parse()

    def data_received(self, data):
        self.buf += data
        if not self.streaming:
            self.parse()

    def parse(self):
        while not self.streaming:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.handle(method, path, body)

    def send(self, status, payload, content_type="application/json"):
        data = payload if isinstance(payload, bytes) else (
            json.dumps(payload).encode() if content_type == "application/json" else payload.encode())
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "OK")
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            status, reason.encode(), content_type.encode(), len(data), data))

    def handle(self, method, path, body):
        if path == "/" and method in ("GET", "HEAD"):
            return self.send(200, b"Ollama is running", "text/plain; charset=utf-8")
        if path == "/api/version":
            return self.send(200, {"version": "0.33.0"})
        if path == "/api/tags":
            return self.send(200, {"models": [_tag(m) for m in MODELS]})
        if path == "/v1/models":
            return self.send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "library"} for m in MODELS]})
        if path == "/_bench/stats":
            late = sorted(STATE.lateness)
            p99 = late[int(len(late) * 0.99)] if late else 0.0
            stats = {"open": STATE.open, "peak_open": STATE.peak_open, "served": STATE.served,
                     "tick_late_p99_ms": p99 * 1000, "tick_late_max_ms": STATE.max_late * 1000}
            return self.send(200, stats)
        if method != "POST":
            return self.send(404, b"404 page not found", "text/plain")
        try:
            request = json.loads(body) if body else None
        except ValueError:
            request = None
        if path == "/_bench/script":
            STATE.tokens = int(request.get("tokens", 20))
            STATE.gap = float(request.get("gap", 0.0))
            STATE.text = request.get("text", "tok ")
            STATE.lateness.clear()
            STATE.max_late = 0.0
            STATE.peak_open = STATE.open
            return self.send(200, {"ok": True})
        if not isinstance(request, dict):
            return self.send(400, {"error": "missing request body"})
        model = request.get("model") or ""
        full = model if ":" in model else model + ":latest"
        if path == "/api/show":
            if full not in MODELS:
                return self.send(404, {"error": f"model '{model}' not found"})
            return self.send(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                                   "details": _tag(full)["details"]})
        if path != "/api/chat":
            return self.send(404, b"404 page not found", "text/plain")
        if not model:
            return self.send(400, {"error": "model is required"})
        if full not in MODELS:
            return self.send(404, {"error": f"model '{model}' not found"})
        messages = request.get("messages") or []
        words = sum(len(str(m.get("content", "")).split()) for m in messages)
        count = STATE.tokens
        if request.get("stream", True) is False:
            return self.send(200, {"model": model, "created_at": STAMP, "message": {
                "role": "assistant", "content": STATE.text * count}, "done": True, "done_reason": "stop",
                "total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": max(1, words),
                "prompt_eval_duration": 342546000, "eval_count": count, "eval_duration": count * 20_000_000})
        token, final = STATE.token_line(model), STATE.final_line(model, words, count)
        if STATE.gap <= 0:  # the whole answer at once: one write
            self.transport.write(HEAD + token * count + final)
            STATE.served += 1
            return
        self.streaming = True
        STATE.open += 1
        STATE.peak_open = max(STATE.peak_open, STATE.open)
        schedule(Stream(self, count, token, final), max(1, round(STATE.gap / TICK)))


async def main(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, "127.0.0.1", port, backlog=4096, reuse_address=True)
    STATE.t0 = loop.time()
    loop.call_at(STATE.t0 + TICK, tick, loop)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop  # a faster event loop (libuv): fewer microseconds per write at 1,000 streams
        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
