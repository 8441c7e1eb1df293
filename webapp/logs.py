"""Request ids and logging: every log line of a request carries its id, and each request gets one
access line (method, path, status, duration, user).

A log record is one line: control characters (CR, LF, TAB, ESC, …) and Unicode line separators in
its message and arguments are written as escapes (`\\x0a`, `\\u2028`), so a URL path, a model name
or a username cannot forge a log line or colour a terminal. Tracebacks keep their lines."""
import contextvars
import logging
import re
import time
import uuid

from flask import g, request

from .wsgi_body import after_body

request_id_var = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("webapp.access")
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# C0, DEL and C1 controls, and Unicode's line and paragraph separators.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text):
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else f"\\u{ord(m.group()):04x}", text)


class RequestIdFilter(logging.Filter):
    """Adds the request id, and makes the record's message one line (escaped controls): the one place
    every record of the app's loggers passes, whoever wrote it."""

    def filter(self, record):
        record.request_id = request_id_var.get()
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to the formatter's own error report
            return True
        if CONTROL.search(message):
            record.msg, record.args = escape_controls(message), None
        return True


def setup_logging(level):
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger("webapp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def init_request_ids(app):
    @app.before_request
    def assign_request_id():
        incoming = request.headers.get("X-Request-ID", "")
        # Take the caller's id when it is sane, so a trace crosses services; otherwise make one.
        g.request_id = incoming if SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.monotonic()
        request_id_var.set(g.request_id)

    @app.after_request
    def log_access(response):
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        method, path, started, user = request.method, request.path, g.get("started", time.monotonic()), _user()

        written = []

        def write():
            # Runs when the body is fully sent: durations of streams are their whole length.
            if written:  # a file's HEAD or 304: werkzeug closes the file and then runs this too
                return
            written.append(True)
            token = request_id_var.set(request_id)
            access_log.info("%s %s %s %.1fms user=%s", method, path, response.status_code,
                            (time.monotonic() - started) * 1000, user)
            request_id_var.reset(token)

        response.call_on_close(write)
        if response.direct_passthrough:  # a file (static, export): werkzeug hands it to the server
            response.response = after_body(response.response, write, request.environ)  # as it is
        return response


def _user():
    # A name captured when the user was loaded: the ORM object may be detached by then.
    return g.get("user_name") or "-"
