"""The one LLM client: list models, stream a chat, report health, whatever the backend.

Two backends speak the same interface and raise the same typed errors:
- OllamaClient: Ollama's native API (`/api/chat` NDJSON streams, `/api/tags`, `/api/version`);
- OpenAIClient: any OpenAI-compatible server (vLLM, TGI, llama.cpp's server, LM Studio):
  `/v1/models` and `/v1/chat/completions` streamed as Server-Sent Events.

This module knows nothing of Flask requests or the database: the chat service feeds it plain
lists of {"role", "content"} dicts and reads back `Chunk`s.
"""
import contextlib
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

import orjson
import requests
import urllib3

from . import model_http

log = logging.getLogger(__name__)


# ---- typed errors ------------------------------------------------------------------------------

class LLMError(Exception):
    """Base of every LLM failure; `code` and `status` map it to an API answer."""

    code = "upstream_error"
    status = 502

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class LLMUnreachable(LLMError):
    code, status = "llm_unreachable", 503


class LLMTimeout(LLMError):
    code, status = "llm_timeout", 504


class ModelNotFound(LLMError):
    code, status = "model_not_found", 404


class UpstreamError(LLMError):
    code, status = "upstream_error", 502


class Cancelled(LLMError):
    """Raised out of a stream that was aborted on purpose (Stop)."""

    code, status = "cancelled", 499


# ---- stream pieces ------------------------------------------------------------------------------

@dataclass
class Chunk:
    """A piece of an answer. The last one has done=True and the counters (Ollama's names)."""

    text: str = ""
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    total_duration: int | None = None  # nanoseconds
    load_duration: int | None = None
    prompt_eval_duration: int | None = None
    eval_duration: int | None = None


def _socket_of(response):
    """The TCP socket under a streamed requests response (to set its read timeout)."""
    conn = getattr(response.raw, "connection", None) or getattr(response.raw, "_connection", None)
    return getattr(conn, "sock", None)


class Abort:
    """Stops one LLM request from any thread: the socket is shut down, which wakes the reading
    thread at once and is how Ollama learns to stop generating. Works while the model is still
    loading (before any header arrived) as well as mid-answer."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sock = None
        self.requested = False

    def attach(self, sock):
        with self._lock:
            self._sock = sock
            if self.requested:
                _shutdown(sock)

    def detach(self):
        """The request is over and its connection may serve another one: a late Stop must not
        shut that connection down."""
        with self._lock:
            self._sock = None

    def __call__(self):
        with self._lock:
            self.requested = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# requests does not expose the socket before the response headers arrive, so the connection
# classes of our session hand it to the Abort of the request being made on this thread.
_tracking = threading.local()


class _Tracked:
    """Also sends a request's head with its body (bytes: every call the app makes) in one send():
    urllib3 sends them apart, two segments and two wake-ups of the model server instead of one."""
    _head = None  # the head, held for the body while a request with a bytes body is being sent

    def request(self, method, url, body=None, headers=None, **kwargs):
        abort = getattr(_tracking, "abort", None)
        if abort is not None:
            if self.sock is None:
                self.connect()
            abort.attach(self.sock)
        if not isinstance(body, bytes) or not body or kwargs.get("chunked"):
            return super().request(method, url, body=body, headers=headers, **kwargs)
        self._head = b""  # the next send() is the head (http.client sends it whole)
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)
            if self._head:  # no body went after all: the head goes alone
                super().send(self._head)
        finally:
            self._head = None

    def send(self, data):
        if self._head is None:
            return super().send(data)
        if not self._head:
            self._head = data
            return None
        head, self._head = self._head, None
        return super().send(head + data)


class _TrackedHTTPConnection(_Tracked, urllib3.connection.HTTPConnection):
    pass


class _TrackedHTTPSConnection(_Tracked, urllib3.connection.HTTPSConnection):
    pass


class _TrackedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class _TrackingAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}


class Gathering:
    """Reads the socket under a chunked answer at most once per `window` seconds once `begin()` is
    called (after the first token, which goes out at once). A model sends a token every ~20 ms, and
    a read that waits for each one costs a wake-up of the reader and of every follower (reading the
    model was a quarter of the app's CPU in a burst of 1,000 streams, and the followers' wake-ups
    and sends as much again). When a read comes less than `window` after the last one, the rest of
    the window is slept out and everything that came meanwhile is taken at once. This only decides
    when bytes are fetched: model_http.unchunked takes them out of their chunks and gives the
    connection back to the pool at the end. A Stop shuts the socket down: it is seen after the
    sleep, within `window`. `window` may be a function, asked before each read: a worker widens
    its windows when it reads many answers at once (generation: the registry's window())."""

    READ_MAX = 64 * 1024

    def __init__(self, file, window):
        self._file = file  # http.client's buffered file of the socket, past the headers
        self._window = window if callable(window) else (lambda: window)
        self._begun = False
        self._last_read = 0.0  # monotonic time of the last read of the socket

    def begin(self):
        self._begun = True

    def read1(self):
        """What one read of the socket brings (b"" at its end), once the window is out."""
        if self._begun:
            wait = self._last_read + self._window() - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        data = self._file.read1(self.READ_MAX)
        self._last_read = time.monotonic()
        return data


class ChatStream:
    """Iterates the Chunks of one streamed answer; `abort()` may be called from any thread.
    `gather`: once the first token is out, read the socket at most once per this many seconds (a
    number, or a function giving it; Gathering)."""

    def __init__(self, answer, parse_lines, read_timeout, abort=None, gather=0.0):
        self._answer = answer  # a model_http.Answer, or a _RequestsAnswer
        self._parse_lines = parse_lines
        self._abort = abort or Abort()
        # A chunked, undecoded body (what Ollama and OpenAI-compatible servers stream) is read by
        # the app; with a `gather` of 0 as the bytes come. Anything else: as its reader brings it.
        self._gathering = (Gathering(answer.file, gather) if answer.chunked and not answer.encoded
                           else None)
        self._windowed = bool(gather) and self._gathering is not None
        sock = answer.sock
        if sock is not None:
            self._abort.attach(sock)
            if read_timeout:
                # The wait for headers used the (long) load timeout; between tokens the read timeout holds.
                sock.settimeout(read_timeout)

    @property
    def gathers(self):
        """True when the answer is read in windows (Gathering), once its first token is out."""
        return self._windowed

    def abort(self):
        self._abort()

    @property
    def aborted(self):
        return self._abort.requested

    def close(self):
        self._abort.detach()
        self._answer.close()

    def __iter__(self):
        lines = self._lines()
        try:
            for chunk in self._parse_lines(lines):
                yield chunk
                if self._gathering is not None:
                    self._gathering.begin()
            self._drain(lines)
        except LLMError:
            if self.aborted:
                raise Cancelled("stopped") from None
            raise
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if self.aborted:
                raise Cancelled("stopped") from None
            raise _stream_error(exc) from exc
        finally:
            self.close()

    def _drain(self, lines, limit=64 * 1024):
        """The parser stops at the final line; read the body to its end (the server closes it right
        after) so the connection goes back to the pool and the next answer reuses it. Closing a
        response whose body is not consumed makes urllib3 drop the socket instead."""
        extra = 0
        try:
            for line in lines:
                extra += len(line)
                if extra > limit:  # a server that keeps talking after the end: not worth keeping
                    return
        except Exception:  # the answer is whole already; a broken tail only costs the connection
            log.debug("LLM stream tail could not be read; the connection is dropped", exc_info=True)

    def _lines(self):
        """Split the body on newlines ourselves: multi-byte UTF-8 is only decoded per whole line."""
        buffer = b""
        for data in self._answer.body(self._gathering):
            if self.aborted:
                raise Cancelled("stopped")
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    yield line.decode("utf-8")
        if buffer.strip():
            yield buffer.decode("utf-8")


def _loads(line):
    """One line of a streamed answer, parsed: by orjson (a sixth of json's cost here, paid once per
    token of every answer), or by json for what only json accepts (NaN, a lone surrogate's escape)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)


def _stream_error(exc):
    text = str(exc)
    if "timed out" in text.lower() or isinstance(exc, (requests.Timeout, socket.timeout)):
        return LLMTimeout("the model server stopped sending text (read timeout)")
    return UpstreamError("the connection to the model server broke mid-answer")


# ---- the shared HTTP plumbing ---------------------------------------------------------------------

class _HTTPBackend:
    name = "base"

    def __init__(self, base_url, *, connect_timeout=5.0, read_timeout=120.0, load_timeout=300.0,
                 options=None, session=None):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.load_timeout = max(load_timeout, read_timeout)
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        # One pooled session per process: keep-alive connections to the LLM server are reused.
        self.session = session or requests.Session()
        adapter = _TrackingAdapter(pool_connections=4, pool_maxsize=64)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        _settle_environment(self.session, self.base_url)
        self._direct = _direct_pool(self.session, self.base_url)
        self._base_path = urllib3.util.parse_url(self.base_url).path or ""

    @contextlib.contextmanager
    def _calling(self, path, abort, errors, typed):
        """Around one request to the model server: `abort` tracks its connection, and a failure
        (one of `errors`) becomes `typed(exc)`, or Cancelled when it was stopped on purpose."""
        _tracking.abort = abort
        try:
            yield
        except errors as exc:
            if abort is not None and abort.requested:
                raise Cancelled("stopped") from None
            # The URL goes to the operator's log, not to clients: the LLM's address is configuration.
            log.warning("LLM request to %s%s failed: %s", self.base_url, path, exc)
            raise typed(exc) from exc
        finally:
            _tracking.abort = None

    def _request(self, method, path, *, timeout=None, abort=None, **kwargs):
        with self._calling(path, abort, requests.RequestException, _request_error):
            return self.session.request(method, self.base_url + path,
                                        timeout=timeout or (self.connect_timeout, self.read_timeout), **kwargs)

    def _json(self, response):
        try:
            return response.json()
        except (ValueError, OSError):  # not JSON, or the body could not be read
            return {}

    def _open_stream(self, path, body, model, parse, abort, gather):
        """POST a streaming chat; headers may wait for a model load, so they get the load timeout."""
        if self._direct is not None:
            answer = self._post_direct(path, body, abort)
        else:
            answer = _RequestsAnswer(self._request("POST", path, json=body, stream=True, abort=abort,
                                                   timeout=(self.connect_timeout, self.load_timeout)))
        if answer.status != 200:
            raise self._status_error(answer, model)
        return ChatStream(answer, parse, self.read_timeout, abort, gather)

    def _post_direct(self, path, body, abort):
        """The chat POST as one lean exchange of the app's own (model_http), over its kept-alive
        connections: requests' per-call work was half of a short answer's client time (0.99 ms
        against 0.47), and urllib3's and http.client's most of the rest."""
        headers = {**self.session.headers, "Content-Type": "application/json",
                   "Accept-Encoding": "identity"}  # the body is read as it comes: not compressed
        with self._calling(path, abort, (OSError, ValueError), _direct_error):
            answer = self._direct.post(self._base_path + path, json.dumps(body).encode(), headers,
                                       connect_timeout=self.connect_timeout,
                                       head_timeout=self.load_timeout, abort=abort)
        if answer.encoded:
            answer.close()
            raise UpstreamError("the model server compressed its answer, which was not asked for")
        return answer

    def _status_error(self, response, model):
        # Ollama says {"error": "text"}; OpenAI-compatible servers {"error": {"message": "text"}}.
        error = self._json(response).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or f"status {response.status}"
        response.close()
        if response.status == 404:
            return ModelNotFound(f"model '{model}' not found on the model server")
        if response.status == 503:
            return LLMUnreachable(f"the model server is busy: {message}")
        return UpstreamError(f"the model server failed: {message}")


def _settle_environment(session, base_url):
    """What requests would read from the environment on every call (proxies and NO_PROXY, the CA
    bundle, ~/.netrc), read once: the LLM's address is configuration, fixed for the process, and
    scanning os.environ per call was a tenth of a turn's CPU."""
    if not session.trust_env:
        return
    settings = session.merge_environment_settings(base_url, {}, None, None, None)
    session.proxies = settings["proxies"]
    session.verify = settings["verify"]
    if session.auth is None:
        session.auth = requests.utils.get_netrc_auth(base_url)
    session.trust_env = False


def _direct_pool(session, base_url):
    """The app's own connections to the model server when a chat may skip requests: plain HTTP, no
    proxy for it, no netrc credentials (the usual local Ollama or vLLM). Else None: requests does it."""
    if not base_url.startswith("http://") or session.auth is not None:
        return None
    if requests.utils.select_proxy(base_url, session.proxies):
        return None
    url = urllib3.util.parse_url(base_url)
    return model_http.Pool(url.host, url.port or 80, max_idle=64)


class _RequestsAnswer:
    """A requests.Response as ChatStream reads a model_http.Answer (a TLS or proxied model server):
    a chunked, undecoded body is taken out of its chunks by the app from http.client's file."""

    def __init__(self, response):
        self._response = response
        self.status = response.status_code
        self.sock = _socket_of(response)
        raw = response.raw
        file = getattr(getattr(raw, "_fp", None), "fp", None)
        self.file = file if hasattr(file, "read1") else None
        self.chunked = self.file is not None and bool(getattr(raw, "chunked", False))
        self.encoded = raw.headers.get("content-encoding", "identity").lower() != "identity"

    def body(self, source):
        if source is None:
            return self._response.iter_content(chunk_size=4096)
        return model_http.unchunked(source, self._done)

    def _done(self):
        raw = self._response.raw
        raw._fp._close_conn()  # the http.client response is read (what its own reader does)
        raw.release_conn()

    def json(self):
        return self._response.json()

    def close(self):
        self._response.close()


def _direct_error(exc):
    """The typed error _request_error gives for what requests makes of the same failure."""
    if isinstance(exc, model_http.ConnectFailed):
        return LLMUnreachable("cannot reach the model server")
    if isinstance(exc, TimeoutError):
        return LLMTimeout("the model server did not answer in time")
    if isinstance(exc, OSError):
        return LLMUnreachable("cannot reach the model server")
    return UpstreamError("the request to the model server failed")


def _request_error(exc):
    if isinstance(exc, requests.ConnectTimeout):
        return LLMUnreachable("cannot reach the model server")
    if isinstance(exc, requests.Timeout):
        return LLMTimeout("the model server did not answer in time")
    if isinstance(exc, requests.ConnectionError):
        return LLMUnreachable("cannot reach the model server")
    return UpstreamError("the request to the model server failed")


# ---- Ollama ------------------------------------------------------------------------------------

class OllamaClient(_HTTPBackend):
    name = "ollama"

    def __init__(self, base_url, *, keep_alive=None, **kwargs):
        super().__init__(base_url, **kwargs)
        self.keep_alive = keep_alive

    def health(self):
        response = self._request("GET", "/api/version", timeout=(self.connect_timeout, 5))
        if response.status_code != 200:
            raise UpstreamError(f"the model server answered {response.status_code}")
        return {"backend": self.name, "version": self._json(response).get("version")}

    def list_models(self):
        response = self._request("GET", "/api/tags", timeout=(self.connect_timeout, 10))
        if response.status_code != 200:
            raise UpstreamError(f"listing models failed with status {response.status_code}")
        models = self._json(response).get("models") or []
        return [{"name": m.get("name") or m.get("model"), "size": m.get("size"),
                 "family": (m.get("details") or {}).get("family"),
                 "parameter_size": (m.get("details") or {}).get("parameter_size")} for m in models]

    def chat_stream(self, messages, model, options=None, abort=None, gather=0.0):
        body = {"model": model, "messages": messages, "stream": True}
        merged = {**self.options, **(options or {})}
        if merged:
            body["options"] = merged
        if self.keep_alive is not None:
            body["keep_alive"] = _keep_alive(self.keep_alive)
        return self._open_stream("/api/chat", body, model, self._parse, abort, gather)

    @staticmethod
    def _parse(lines):
        for line in lines:
            data = _loads(line)
            if "error" in data:  # an error after streaming began arrives as a line under status 200
                raise UpstreamError(f"the model server failed mid-answer: {data['error']}")
            text = (data.get("message") or {}).get("content") or ""
            if not data.get("done"):
                if text:
                    yield Chunk(text=text)
                continue
            yield Chunk(text=text, done=True, done_reason=data.get("done_reason"),
                        prompt_eval_count=data.get("prompt_eval_count"), eval_count=data.get("eval_count"),
                        total_duration=data.get("total_duration"), load_duration=data.get("load_duration"),
                        prompt_eval_duration=data.get("prompt_eval_duration"),
                        eval_duration=data.get("eval_duration"))
            return
        raise UpstreamError("the model server ended the answer without finishing it")


def _keep_alive(value):
    """OLLAMA_KEEP_ALIVE is seconds ("300", "-1") or a duration string ("5m")."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


# ---- OpenAI-compatible ---------------------------------------------------------------------------

# Ollama option names -> chat-completions fields.
OPENAI_OPTION_NAMES = {"temperature": "temperature", "num_predict": "max_tokens", "seed": "seed",
                       "stop": "stop", "top_p": "top_p", "frequency_penalty": "frequency_penalty",
                       "presence_penalty": "presence_penalty"}


class OpenAIClient(_HTTPBackend):
    name = "openai"

    def __init__(self, base_url, *, api_key="", **kwargs):
        super().__init__(base_url, **kwargs)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def health(self):
        self.list_models()
        return {"backend": self.name, "version": None}

    def list_models(self):
        response = self._request("GET", "/models", timeout=(self.connect_timeout, 10))
        if response.status_code != 200:
            raise UpstreamError(f"listing models failed with status {response.status_code}")
        return [{"name": m.get("id"), "size": None, "family": None, "parameter_size": None}
                for m in self._json(response).get("data") or []]

    def chat_stream(self, messages, model, options=None, abort=None, gather=0.0):
        body = {"model": model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}}
        for key, value in {**self.options, **(options or {})}.items():
            if key in OPENAI_OPTION_NAMES:
                body[OPENAI_OPTION_NAMES[key]] = value
        return self._open_stream("/chat/completions", body, model, self._parse, abort, gather)

    @staticmethod
    def _parse(lines):
        final = Chunk(done=True)
        count, first_at = 0, None
        for line in lines:
            if not line.startswith("data:"):
                continue  # SSE comments, event names, ids
            payload = line[5:].strip()
            if payload == "[DONE]":
                yield _with_estimates(final, count, first_at)
                return
            data = _loads(payload)
            if "error" in data:
                error = data["error"]
                raise UpstreamError(f"the model server failed mid-answer: "
                                    f"{error.get('message') if isinstance(error, dict) else error}")
            for choice in data.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    count += 1
                    first_at = first_at or time.monotonic_ns()
                    yield Chunk(text=text)
                if choice.get("finish_reason"):
                    final.done_reason = choice["finish_reason"]
            usage = data.get("usage")
            if usage:
                final.prompt_eval_count = usage.get("prompt_tokens")
                final.eval_count = usage.get("completion_tokens")
        if final.done_reason:  # some servers end without [DONE]
            yield _with_estimates(final, count, first_at)
            return
        raise UpstreamError("the model server ended the answer without finishing it")


def _with_estimates(final, count, first_at):
    """Servers that send no usage (llama.cpp's) still get a token count and speed: one streamed
    chunk is one token on these servers, timed from the first chunk to the last."""
    if final.eval_count is None and count:
        final.eval_count = count
        if first_at and count > 1:
            final.eval_duration = max(1, time.monotonic_ns() - first_at)
    return final


# ---- construction --------------------------------------------------------------------------------

def model_options(config):
    """The generation options the operator set (Ollama names); unset ones are left to the server."""
    options = {}
    if config.get("LLM_TEMPERATURE", -1) >= 0:
        options["temperature"] = config["LLM_TEMPERATURE"]
    if config.get("LLM_NUM_CTX"):
        options["num_ctx"] = config["LLM_NUM_CTX"]
    if config.get("LLM_NUM_PREDICT"):
        options["num_predict"] = config["LLM_NUM_PREDICT"]
    return options


def client_from_config(config):
    common = {"connect_timeout": config["LLM_CONNECT_TIMEOUT"], "read_timeout": config["LLM_READ_TIMEOUT"],
              "load_timeout": config["OLLAMA_LOAD_TIMEOUT"], "options": model_options(config)}
    if config["LLM_BACKEND"] == "openai":
        return OpenAIClient(config["OPENAI_BASE_URL"], api_key=config["OPENAI_API_KEY"], **common)
    if config["LLM_BACKEND"] != "ollama":
        raise ValueError(f"LLM_BACKEND must be 'ollama' or 'openai', not {config['LLM_BACKEND']!r}")
    return OllamaClient(config["OLLAMA_URL"], keep_alive=config["OLLAMA_KEEP_ALIVE"], **common)
