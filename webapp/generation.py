"""Generations run in background threads owned by the server, not by the request that started them.

A request starts a generation and then only *follows* it. If the client goes away, the thread
carries on and saves the whole answer. While it runs, the text so far is written to the message row
every STREAM_FLUSH_SECONDS (throttled, never per token) and a heartbeat every HEARTBEAT_SECONDS, so
any worker or replica can replay it and tell a live generation from one whose worker died.

Per process there is a registry of live generations and one watchdog thread that writes the
heartbeats and polls the database for Stop requests made on other workers.
"""
import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select, update

from . import llm
from .extensions import db
from .logs import request_id_var
from .models import (ACTIVE_STATUSES, CANCELLED, COMPLETE, ERROR, INTERRUPTED, STREAMING, Conversation,
                     Message, utcnow)

log = logging.getLogger(__name__)
WATCHDOG_TICK = 0.2  # seconds: Stop from another worker closes the upstream within about this
SHUTDOWN_MESSAGE = "the server restarted while generating this answer; retry to generate it again"


@dataclass
class Job:
    message_id: int
    conversation_id: int
    model: str
    messages: list
    options: dict = field(default_factory=dict)
    request_id: str | None = None


class Live:
    """In-process view of one running generation: its text so far, and a way to abort it."""

    def __init__(self, message_id):
        self.message_id = message_id
        self.text = ""
        self.done = False
        self.cancelled = False
        self.interrupted = False  # the server is shutting down, not the user pressing Stop
        self.upstream = llm.Abort()  # closes the connection to the LLM, even while the model loads
        self._cond = threading.Condition()

    def append(self, text):
        with self._cond:
            self.text += text
            self._cond.notify_all()

    def finish(self):
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait(self, seen, timeout):
        """Block until there is text past `seen` characters, the end, or the timeout."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.text) > seen or self.done, timeout)

    def abort(self, interrupted=False):
        self.interrupted = self.interrupted or interrupted
        self.cancelled = True
        self.upstream()


class Registry:
    """The generations running in this process, plus their watchdog."""

    def __init__(self, app):
        self.app = app
        self._live = {}
        self._lock = threading.Lock()
        self._watchdog = None

    def get(self, message_id):
        return self._live.get(message_id)

    def ids(self):
        with self._lock:
            return list(self._live)

    def launch(self, job, client):
        live = Live(job.message_id)
        with self._lock:
            self._live[job.message_id] = live
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = threading.Thread(target=self._watch, name="generation-watchdog", daemon=True)
                self._watchdog.start()
        thread = threading.Thread(target=self._run, args=(job, live, client), daemon=True,
                                  name=f"generation-{job.message_id}")
        thread.start()
        return live

    def abort(self, message_id):
        live = self._live.get(message_id)
        if live is not None:
            live.abort()
        return live is not None

    def shutdown(self, timeout=5.0):
        """On worker exit: end running generations as 'interrupted' with their text so far, at once,
        rather than leaving them for the stale-heartbeat check to find."""
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            live.abort(interrupted=True)
        deadline = time.monotonic() + timeout
        while self.ids() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- the generation thread -------------------------------------------------------------------

    def _run(self, job, live, client):
        request_id_var.set(job.request_id or "-")
        with self.app.app_context():
            try:
                Generation(job, live, client, self.app.config).run()
            finally:
                with self._lock:
                    self._live.pop(job.message_id, None)
                live.finish()
                db.session.remove()

    # -- the watchdog --------------------------------------------------------------------------

    def _watch(self):
        """Write heartbeats and honour Stop requests made on other workers, until idle."""
        last_beat = 0.0
        with self.app.app_context():
            while True:
                time.sleep(WATCHDOG_TICK)
                ids = self.ids()
                if not ids:
                    with self._lock:
                        if not self._live:
                            self._watchdog = None
                            return
                    continue
                try:
                    self._abort_cancelled(ids)
                    if time.monotonic() - last_beat >= self.app.config["HEARTBEAT_SECONDS"]:
                        self._beat(ids)
                        last_beat = time.monotonic()
                except Exception:  # a database hiccup must not kill the watchdog
                    log.exception("generation watchdog tick failed")
                    db.session.rollback()
                finally:
                    db.session.close()

    def _abort_cancelled(self, ids):
        cancelled = db.session.scalars(
            select(Message.id).where(Message.id.in_(ids), Message.cancel_requested.is_(True))).all()
        db.session.rollback()
        for message_id in cancelled:
            self.abort(message_id)

    def _beat(self, ids):
        db.session.execute(update(Message).where(Message.id.in_(ids), Message.status.in_(ACTIVE_STATUSES))
                           .values(heartbeat_at=utcnow()))
        db.session.commit()


class Generation:
    """One answer being generated: stream from the LLM, flush now and then, save the outcome."""

    def __init__(self, job, live, client, config):
        self.job, self.live, self.client = job, live, client
        self.flush_every = config["STREAM_FLUSH_SECONDS"]
        self.final = None
        self.started = time.monotonic()

    def run(self):
        status, code, error = COMPLETE, None, None
        try:
            self._set(status=STREAMING, heartbeat_at=utcnow())
            self._stream()
        except llm.Cancelled:
            status = CANCELLED
            if self.live.interrupted:
                status, code, error = INTERRUPTED, "interrupted", SHUTDOWN_MESSAGE
        except llm.LLMError as exc:
            status, code, error = ERROR, exc.code, exc.message
        except Exception as exc:  # a bug must still leave the message in a final state
            log.exception("generation %s failed", self.job.message_id)
            status, code, error = ERROR, "internal_error", f"internal error: {type(exc).__name__}"
        if status == COMPLETE and self.live.cancelled and self.final is None:
            status = CANCELLED
        self._save(status, code, error)

    def _stream(self):
        stream = self.client.chat_stream(self.job.messages, self.job.model, self.job.options,
                                         abort=self.live.upstream)
        last_flush = time.monotonic()
        for chunk in stream:
            if chunk.text:
                self.live.append(chunk.text)
            if chunk.done:
                self.final = chunk
            if time.monotonic() - last_flush >= self.flush_every:
                self._set(content=self.live.text, heartbeat_at=utcnow())
                last_flush = time.monotonic()

    def _set(self, **values):
        db.session.execute(update(Message).where(Message.id == self.job.message_id,
                                                 Message.status.in_(ACTIVE_STATUSES)).values(**values))
        db.session.commit()

    def _save(self, status, code, error):
        """The final write: the message and the conversation's busy flag, in one transaction."""
        final = self.final or llm.Chunk()
        now = utcnow()
        for attempt in range(3):
            try:
                db.session.execute(update(Message).where(Message.id == self.job.message_id).values(
                    content=self.live.text, status=status, error_code=code, error=error, finished_at=now,
                    heartbeat_at=now, done_reason=final.done_reason, prompt_tokens=final.prompt_eval_count,
                    completion_tokens=final.eval_count, total_duration=final.total_duration,
                    load_duration=final.load_duration, prompt_eval_duration=final.prompt_eval_duration,
                    eval_duration=final.eval_duration))
                db.session.execute(update(Conversation).where(
                    Conversation.id == self.job.conversation_id,
                    Conversation.active_message_id == self.job.message_id).values(
                    active_message_id=None, updated_at=now))
                db.session.commit()
                break
            except Exception:
                db.session.rollback()
                log.exception("saving message %s failed (attempt %d)", self.job.message_id, attempt + 1)
                time.sleep(0.5 * (attempt + 1))
        self._log(status, code, final)

    def _log(self, status, code, final):
        log.info("llm call model=%s outcome=%s%s chars=%d prompt_tokens=%s completion_tokens=%s "
                 "done_reason=%s load_ms=%s eval_ms=%s wall_ms=%d", self.job.model, status,
                 f"/{code}" if code else "", len(self.live.text), final.prompt_eval_count, final.eval_count,
                 final.done_reason, _ms(final.load_duration), _ms(final.eval_duration),
                 (time.monotonic() - self.started) * 1000)


def _ms(ns):
    return round(ns / 1e6) if ns else None


def start_orphan_sweeper(app):
    """In each served process (gunicorn's post_worker_init): every ORPHAN_SWEEP_SECONDS, save
    answers whose worker died as interrupted and free their conversations, whether or not anyone
    is looking. Every worker sweeps; the guarded UPDATE makes doing it twice harmless."""
    every = app.config["ORPHAN_SWEEP_SECONDS"]
    if every <= 0:
        return None  # off: reads still find orphans (reap_if_stale)

    def sweep():
        from .chat import reap_stale
        with app.app_context():
            while True:
                time.sleep(every)
                try:
                    reaped = reap_stale()
                    if reaped:
                        log.warning("saved %d answer(s) orphaned by a dead worker as interrupted", reaped)
                except Exception:  # a database hiccup must not end the sweeper
                    log.exception("orphan sweep failed")
                    db.session.rollback()
                finally:
                    db.session.remove()
    thread = threading.Thread(target=sweep, name="orphan-sweeper", daemon=True)
    thread.start()
    return thread


def registry_for(app):
    registry = app.extensions.get("generations")
    if registry is None:
        registry = app.extensions["generations"] = Registry(app)
    return registry
