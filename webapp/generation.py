"""Generations run in the background, owned by the server, not by the request that started them.

A request starts a generation and then only *follows* it. If the client goes away, the generation
carries on and saves the whole answer. While it runs, the text so far is saved every
STREAM_FLUSH_SECONDS (by the per-process watchdog, in one batch for every running answer, never per
token) and a heartbeat every HEARTBEAT_SECONDS, so any
worker or replica can replay it and tell a live generation from one whose worker died. Every write
goes through webapp/answers.py, the owner of an answer's life in the database.

`generations` (an extension, bound in create_app) is this process's registry of live generations,
with one watchdog that writes the heartbeats and honours Stop requests made on other workers.
Everything runs through `spawn`: the one place that decides what a background task is.

The queue in front of the model (LLM_MAX_PARALLEL > 0): an answer starts 'queued'; its generation
first asks for a slot once (answers.admit) and, if none is free, waits on its Live without a
database connection or an OS thread (a greenlet under gevent) while the watchdog asks for slots for
all of this process's waiting answers in one transaction per tick, and tells each its place in line.
After LLM_QUEUE_TIMEOUT seconds of waiting the answer ends as an error, code `queue_timeout`.
"""
import logging
import threading
import time
from dataclasses import dataclass, field

from flask import current_app
from sqlalchemy.exc import DBAPIError

from . import answers, capacity, llm
from .extensions import db
from .logs import request_id_var
from .models import CANCELLED, COMPLETE, ERROR, INTERRUPTED, Message, detached, ms, stored_text

log = logging.getLogger(__name__)
# A generation in the background reads the model at most once per this long after its first token
# (llm.Gathering), so its followers wake once per window too, not once per token (DESIGN: 25-50 ms).
GATHER_SECONDS = 0.05
# ...while the worker is not busy. Reading and sending cost per window, so with many answers or
# requests at once (past GATHER_READS_PER_SECOND x GATHER_SECONDS = 50) each answer's window widens,
# up to GATHER_MAX_SECONDS, keeping the worker's reads near that rate in all: a burst of streams
# leaves the CPU to the new ones' first tokens (1,000 streams, bench/README.md "Eighth pass").
GATHER_READS_PER_SECOND = 1000
GATHER_MAX_SECONDS = 0.25
ENDED_SECONDS = 5.0  # how long an ended generation's final row stays at hand (_Registry._forget)
WATCHDOG_TICK = 0.2  # seconds: Stop from another worker closes the upstream within about this
QUEUE_TIMEOUT_MESSAGE = "the model was busy with other answers for too long; try again in a while"


class QueueTimeout(Exception):
    pass


def spawn(target, *args, name=None):
    """Run `target(*args)` in the background (a daemon thread; a greenlet once threading is patched)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


@dataclass
class Job:
    """What a generation needs, as plain values (the rows may be deleted while it runs)."""
    message_id: int
    conversation_id: int
    model: str
    messages: list
    options: dict = field(default_factory=dict)
    request_id: str | None = None
    queued: bool = False  # waits for a slot at the model first (answers.admit)


class Live:
    """In-process view of one running generation: its text so far, and a way to abort it."""

    def __init__(self, message_id, model=None):
        self.message_id = message_id
        self.model = model
        # Place in the model's queue while it waits for a slot (1 = next); None when not waiting.
        self.position = None
        self.text = ""
        self.done = False
        self.cancelled = False
        self.interrupted = False  # the server is shutting down, not the user pressing Stop
        self.upstream = llm.Abort()  # closes the connection to the LLM, even while the model loads
        self.gathered = False  # the generation reads the model in windows: followers need not gather too
        self.saved = 0  # characters of the text the database holds (the watchdog flushes the rest)
        self.final = None  # the answer's row as its final save committed it (a detached Message)
        self._ended = threading.Event()  # set with `done`: what wait_done waits on, not woken by each token
        self._cond = threading.Condition()  # the generation's own wait for a slot at the model
        # The followers waiting for news, each by its own Event, reused from one wait to the next:
        # a Condition allocates a lock per wait, which was 5 % of the app's CPU in a burst of streams.
        self._followers = set()

    def append(self, text):
        self.text += text  # one writer (the generation); readers see the old text or the new one
        self._news()

    def _news(self):
        for news in tuple(self._followers):  # a copy: a follower may come or go meanwhile
            news.set()

    def place(self, position):
        """The watchdog's news: a new place in line, or None once admitted (wakes the waiter)."""
        with self._cond:
            self.position = position
            self._cond.notify_all()
        self._news()  # followers tell their place in line at once

    def wait_turn(self, timeout):
        """Block until admitted, aborted or the timeout (not woken by anything else)."""
        with self._cond:
            self._cond.wait_for(lambda: self.position is None or self.cancelled, timeout)

    def finish(self):
        self.done = True
        self._ended.set()
        self._news()

    def wait(self, seen, timeout, news):
        """Block until there is text past `seen` characters, the end, or the timeout. `news` is the
        follower's own threading.Event (the same one at every wait of that follower)."""
        news.clear()  # before the check: news arriving after it sets the event again, none is lost
        self._followers.add(news)
        try:
            if len(self.text) <= seen and not self.done:
                news.wait(timeout)
        finally:
            self._followers.discard(news)

    def wait_done(self, timeout):
        """Block until the end (or the timeout), not woken by each token (Live.wait is); True if ended."""
        return self._ended.wait(timeout)

    def abort(self, interrupted=False):
        self.interrupted = self.interrupted or interrupted
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
        self._news()
        self.upstream()


class Generations:
    """The extension: per app, the generations running in this process, plus their watchdog."""

    def init_app(self, app):
        app.extensions["generations"] = _Registry(app)

    @staticmethod
    def _registry(app=None):
        return (app or current_app).extensions["generations"]

    def launch(self, job, client):
        return self._registry().launch(job, client)

    def run_here(self, job, client):
        """Generate in the calling thread or greenlet; returns the finished Generation (its outcome)."""
        return self._registry().run_here(job, client)

    def get(self, message_id):
        return self._registry().get(message_id)

    def ended(self, message_id):
        """A generation that ended here a moment ago (its Live, final), or None."""
        return self._registry().ended(message_id)

    def is_live(self, message_id):
        """Is this answer being generated in this process? (handed to webapp/answers.py)"""
        return self._registry().get(message_id) is not None

    def abort(self, message_id):
        return self._registry().abort(message_id)

    def shutdown(self, app, timeout=5.0):
        self._registry(app).shutdown(timeout)

    def start_orphan_sweeper(self, app):
        registry = self._registry(app)
        return answers.start_orphan_sweeper(app, lambda message_id: registry.get(message_id) is not None, spawn)


generations = Generations()


class _Finisher:
    """The final saves of this process's answers, group-committed: an answer ending alone is saved
    at once by its own task; answers ending while a save is being committed queue up and the first
    of them then saves them all in one transaction (answers.finish_many), so a burst of 500 streams
    ending together costs a few commits, not 500, and nothing waits for a timer. A failed batch
    falls back to each answer's own retried save (answers.finish)."""

    _LEAD = object()
    _SELF = object()  # the batch's commit was cut short (its leader was killed): save your own

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = []  # [item, event, result]
        self._busy = False

    def save(self, item):
        """1 (or True) when saved, 0 when the row was gone, None/False when every attempt failed."""
        entry = [item, threading.Event(), None]
        with self._lock:
            self._pending.append(entry)
            lead, self._busy = not self._busy, True
        if not lead:
            try:
                entry[1].wait()
            except BaseException:  # killed while waiting (shutdown): never strand the others or itself
                with self._lock:
                    queued = any(other is entry for other in self._pending)
                    self._pending = [other for other in self._pending if other is not entry]
                    if entry[2] is self._LEAD:
                        self._pass_lead()
                if queued:  # no batch has taken it: its answer is saved here, alone, or not at all
                    self._commit([item])
                raise
            if entry[2] is self._SELF:
                return self._commit([item])[0]
            if entry[2] is not self._LEAD:
                return entry[2]
        with self._lock:
            batch, self._pending = self._pending, []
        results = [self._SELF] * len(batch)
        try:
            results = self._commit([item for item, _, _ in batch])
        finally:
            mine = None
            for index, other in enumerate(batch):
                if other is entry:
                    mine = results[index]
                else:
                    other[2] = results[index]
                    other[1].set()
            with self._lock:
                self._pass_lead()
            if mine is self._SELF:  # killed while committing: the others save their own; this one too
                mine = self._commit([item])[0]
        return mine

    def _pass_lead(self):
        """(Under the lock.) The first answer that arrived during a commit saves the next batch."""
        if self._pending:
            self._pending[0][2] = self._LEAD
            self._pending[0][1].set()
        else:
            self._busy = False

    @staticmethod
    def _commit(items):
        """One transaction for the batch (alone too: it also tells a row deleted meanwhile, 0); if it
        fails, each answer's own save with its retries."""
        try:
            saved = answers.finish_many(items)
            return [1 if item[0] in saved else 0 for item in items]
        except DBAPIError as exc:  # e.g. a deadlock with another writer: each row alone cannot deadlock
            log.warning("saving %d answer(s) together failed (%s); saving them one by one",
                        len(items), str(exc.orig).splitlines()[0] if exc.orig else exc)
        except Exception:
            log.exception("saving %d answer(s) failed; saving them one by one, with retries", len(items))
        return [answers.finish(message_id, conversation_id, status, text, code, error, usage=usage)
                for message_id, conversation_id, status, text, code, error, usage in items]


class _Registry:
    def __init__(self, app):
        self.app = app
        self._live = {}
        self._ended = {}  # message id -> (monotonic time, Live): see _forget
        self._lock = threading.Lock()
        self._watchdog = None
        self.finisher = _Finisher()

    def get(self, message_id):
        return self._live.get(message_id)

    def ended(self, message_id):
        """The Live of a generation that ended here less than ENDED_SECONDS ago, or None."""
        entry = self._ended.get(message_id)
        return entry[1] if entry is not None and time.monotonic() - entry[0] <= ENDED_SECONDS else None

    def _forget(self, job, live):
        """The generation is no longer live here. Its Live (with the row as its final save stored it)
        stays at hand for ENDED_SECONDS: a request that starts waiting just after a fast answer ended
        gets it from memory instead of reading the row (service.wait_here)."""
        now = time.monotonic()
        with self._lock:
            if live.final is not None:
                self._ended[job.message_id] = (now, live)
            self._live.pop(job.message_id, None)
            while self._ended:
                oldest = next(iter(self._ended))
                if now - self._ended[oldest][0] <= ENDED_SECONDS:
                    break
                del self._ended[oldest]

    def ids(self):
        with self._lock:
            return list(self._live)

    def window(self):
        """How long a generation here gathers the model's tokens between reads of its socket now: its
        share of the worker's reads, by the answers it generates or the requests it serves (in a
        burst, the streams still to start), whichever is more."""
        busy = max(len(self._live), capacity.open_requests(self.app))
        return min(GATHER_MAX_SECONDS, max(GATHER_SECONDS, busy / GATHER_READS_PER_SECOND))

    def _register(self, job):
        live = Live(job.message_id, job.model)
        with self._lock:
            self._live[job.message_id] = live
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = spawn(self._watch, name="generation-watchdog")
        return live

    def launch(self, job, client):
        live = self._register(job)
        spawn(self._run, job, live, client, name=f"generation-{job.message_id}")
        return live

    def run_here(self, job, client):
        """A generation in the caller's own thread or greenlet (a request that waits for the whole
        answer anyway): no task to start, no wake-up per answer, no re-read of the row. It is
        registered like any other, so Stop, the watchdog's flushes and heartbeats, followers and
        shutdown all see it; the caller's app context and session are used (the session holds no
        connection while the model talks, as everywhere)."""
        live = self._register(job)
        try:
            generation = Generation(job, live, client)
            generation.run()
            return generation
        finally:
            self._forget(job, live)
            live.finish()

    def abort(self, message_id):
        live = self._live.get(message_id)
        if live is not None:
            live.abort()
        return live is not None

    def shutdown(self, timeout):
        """On worker exit: end running generations as 'interrupted' with their text so far, at once,
        rather than leaving them for the stale-heartbeat check to find."""
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            live.abort(interrupted=True)
        deadline = time.monotonic() + timeout
        while self.ids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self, job, live, client):
        request_id_var.set(job.request_id or "-")
        with self.app.app_context():
            try:
                Generation(job, live, client, gather=self.window).run()
            finally:
                self._forget(job, live)
                live.finish()
                db.session.remove()

    def _watch(self):
        """While answers run here: honour Stop requests made on other workers, save every answer's
        new text in one batch each STREAM_FLUSH_SECONDS, and write heartbeats. One task per process,
        so the database sees one flush per tick, not one per answer."""
        config = self.app.config
        tick = min(WATCHDOG_TICK, config["STREAM_FLUSH_SECONDS"])
        last_beat = last_flush = 0.0
        with self.app.app_context():
            while True:
                time.sleep(tick)
                ids = self.ids()
                if not ids:
                    with self._lock:
                        if not self._live:
                            self._watchdog = None
                            return
                    continue
                try:
                    for message_id in answers.cancel_requested(ids):
                        self.abort(message_id)
                    self._admit()
                    if time.monotonic() - last_flush >= config["STREAM_FLUSH_SECONDS"]:
                        self._flush()
                        last_flush = time.monotonic()
                    if time.monotonic() - last_beat >= config["HEARTBEAT_SECONDS"]:
                        answers.beat(ids)
                        last_beat = time.monotonic()
                except Exception:  # a database hiccup must not kill the watchdog
                    log.exception("generation watchdog tick failed")
                    db.session.rollback()
                finally:
                    db.session.close()


    def _admit(self):
        """Ask for slots for every answer of this process still waiting, in one transaction."""
        with self._lock:
            lives = [live for live in self._live.values() if live.position is not None and not live.cancelled]
        if lives:
            _take_places(lives, self.app.config["LLM_MAX_PARALLEL"])

    def _flush(self):
        with self._lock:
            lives = [live for live in self._live.values() if len(live.text) != live.saved and not live.done]
        texts = {live.message_id: live.text for live in lives}
        if texts:
            answers.flush(texts)
            for live in lives:
                live.saved = len(texts[live.message_id])


class Generation:
    """One answer being generated: stream from the LLM, flush now and then, save the outcome."""

    def __init__(self, job, live, client, gather=0.0):
        # `gather` (seconds, or a function giving them): read the model in windows (a generation in
        # the background, which feeds followers); 0 for one run in the request that waits for the
        # whole answer (run_here).
        self.job, self.live, self.client, self.gather = job, live, client, gather
        self.final = None
        self.started = time.monotonic()
        # The outcome, as saved: status, error code and text; `saved` is 1 when the row was written,
        # 0 when it was gone (its conversation deleted meanwhile), None when saving failed.
        self.status = self.code = self.error = self.saved = None

    def run(self):
        status, code, error = COMPLETE, None, None
        try:
            if self.job.queued:
                self._wait_for_slot()
            self._stream()
        except Exception as exc:
            status, code, error = self._failure(exc)
        except BaseException:  # the worker kills this task (shutdown past its grace period): save what is here
            self._save(INTERRUPTED, "interrupted", answers.INTERRUPTED_MESSAGE)
            raise
        self._save(status, code, error)

    def _failure(self, exc):
        """(status, code, error) for what ended the stream."""
        if isinstance(exc, QueueTimeout):
            return ERROR, "queue_timeout", QUEUE_TIMEOUT_MESSAGE
        if isinstance(exc, llm.Cancelled):
            if self.live.interrupted:
                return INTERRUPTED, "interrupted", answers.INTERRUPTED_MESSAGE
            return CANCELLED, None, None
        if isinstance(exc, llm.LLMError):
            return ERROR, exc.code, exc.message
        # A bug must still leave the message in a final state.
        log.error("generation %s failed", self.job.message_id, exc_info=exc)
        return ERROR, "internal_error", f"internal error: {type(exc).__name__}"

    def _save(self, status, code, error):
        if status == COMPLETE and self.live.cancelled and self.final is None:
            status = CANCELLED
        final = self.final or llm.Chunk()
        usage = _usage(final)
        job = self.job
        self.status, self.code, self.error = status, code, error
        self.saved = Generations._registry().finisher.save((job.message_id, job.conversation_id, status,
                                                            self.live.text, code, error, usage))
        if self.saved:
            # Followers here end with this instead of reading the row back (SafeText stores NUL as U+FFFD).
            self.live.final = detached(Message, id=job.message_id, conversation_id=job.conversation_id,
                                       role="assistant", content=stored_text(self.live.text), status=status,
                                       error_code=code, error=error, model=job.model, request_id=job.request_id,
                                       **usage)
        self._log(status, code, final)

    def _wait_for_slot(self):
        """Ask once at once; then wait, holding nothing, for the watchdog's ticks to admit it."""
        config = current_app.config
        deadline = time.monotonic() + config["LLM_QUEUE_TIMEOUT"]
        place = _take_places([self.live], config["LLM_MAX_PARALLEL"]).get(self.job.message_id)
        db.session.close()
        if place is None:  # no longer queued: deleted (or stopped) before it could start
            raise llm.Cancelled("stopped before the model started")
        while self.live.position is not None:
            if self.live.cancelled:
                raise llm.Cancelled("stopped before the model started")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout()
            self.live.wait_turn(min(remaining, 1.0))
        if self.live.cancelled:
            raise llm.Cancelled("stopped before the model started")
        self.started = time.monotonic()

    def _stream(self):
        stream = self.client.chat_stream(self.job.messages, self.job.model, self.job.options,
                                         abort=self.live.upstream, gather=self.gather)
        self.live.gathered = getattr(stream, "gathers", False)  # any iterable of Chunks will do
        first = True
        for chunk in stream:  # the watchdog saves the text so far; this loop never waits on the database
            if chunk.text:
                self.live.append(chunk.text)
                if first:  # let followers send the first token now, not after the tokens already buffered
                    first = False
                    time.sleep(0)
            if chunk.done:
                self.final = chunk

    def _log(self, status, code, final):
        log.info("llm call model=%s outcome=%s%s chars=%d prompt_tokens=%s completion_tokens=%s "
                 "done_reason=%s load_ms=%s eval_ms=%s wall_ms=%d", self.job.model, status,
                 f"/{code}" if code else "", len(self.live.text), final.prompt_eval_count, final.eval_count,
                 final.done_reason, ms(final.load_duration), ms(final.eval_duration),
                 (time.monotonic() - self.started) * 1000)


def _take_places(lives, limit):
    """answers.admit for these waiting lives; each learns its place (None: admitted, it may run)."""
    waiting = {}
    for live in lives:
        waiting.setdefault(answers.model_key(live.model), set()).add(live.message_id)
    places = answers.admit(waiting, limit)
    for live in lives:
        place = places.get(live.message_id)
        if place is not None:
            live.place(place or None)
    return places


def _usage(final):
    """The final chunk's counts and durations, as the message row's columns."""
    return {"done_reason": final.done_reason, "prompt_tokens": final.prompt_eval_count,
            "completion_tokens": final.eval_count, "total_duration": final.total_duration,
            "load_duration": final.load_duration, "prompt_eval_duration": final.prompt_eval_duration,
            "eval_duration": final.eval_duration}

