"""Tokens pushed across workers and replicas: PostgreSQL LISTEN/NOTIFY, one listening connection per
worker, fanned out in-process to that worker's followers.

A follower on a worker that is not generating the answer (webapp/service/turns.py `follow`)
subscribes here and, once it has read the row, *announces its interest*: one
`NOTIFY answer_follow, '<message id>'`, renewed every RENEW_SECONDS by its worker's hub for all of
its followed answers in one NOTIFY, and forgotten by the generating worker INTEREST_SECONDS after the
last renewal (so a follower's crashed worker costs nothing for long). No table, no migration, nothing
to clean up.

The generating worker's hub publishes the new text of every answer it runs *that someone elsewhere
follows* (no interest, no NOTIFY: a NOTIFY takes a cluster-wide lock at commit), batched: at most one
`NOTIFY answer_deltas` per TICK_SECONDS for the whole worker, whatever the number of answers and
followers, its payload at most PAYLOAD_MAX bytes of JSON
`{"d": [[message id, offset, text or null], ...], "e": [ended message ids]}`. A delta whose text does
not fit goes as `[id, offset, null]`: "there is more, read the row". When a followed answer leaves the
worker (its final state is committed first), its id goes out under "e".

The row flush stays the durable copy and the gap-filler: a follower that sees a gap (a missed or
text-less notification) reads the row, and one that hears nothing for SAFETY_SECONDS reads it too
(that also finds an answer orphaned by a dead worker). With SQLite (one machine) there is no hub and
followers poll the row, as before.

Everything the hub does runs in one background task (a greenlet under gunicorn's gevent worker) on
its own psycopg connection, outside the request pool; publishing and renewing use that same
connection between waits, so a worker holds exactly one extra database connection for push.
"""
import json
import logging
import threading
import time
from dataclasses import dataclass

import psycopg
from sqlalchemy import text as sql

from .extensions import db
from .generation import spawn

log = logging.getLogger(__name__)

DELTAS = "answer_deltas"
FOLLOW = "answer_follow"
TICK_SECONDS = 0.025      # at most one NOTIFY of deltas per worker per tick (DESIGN: ~25 ms)
PAYLOAD_MAX = 8000        # PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more
RENEW_SECONDS = 2.0       # a follower's worker repeats its interest this often
INTEREST_SECONDS = 5.0    # the generating worker publishes this long after the last renewal
SAFETY_SECONDS = 2.0      # a follower that hears nothing this long reads the row anyway
IDLE_WAIT = 1.0           # the hub's longest wait for notifications when it has nothing to publish


@dataclass
class Pushed:
    text: str = ""     # the answer's text right after the follower's offset, as far as it is known
    gap: bool = False  # something past a gap (or a text-less delta) arrived: the row has more
    end: bool = False  # the answer left its worker: its final state is in the row


class Subscription:
    """One follower's inbox of pushed deltas for one answer."""

    def __init__(self, hub, message_id):
        self.hub, self.message_id = hub, message_id
        self._deltas = []  # (offset, text or None)
        self._fresh = False
        self._ended = False
        self._cond = threading.Condition()

    def put(self, offset, text):
        with self._cond:
            self._deltas.append((offset, text))
            self._fresh = True
            self._cond.notify_all()

    def end(self):
        with self._cond:
            self._ended = self._fresh = True
            self._cond.notify_all()

    def take(self, sent, timeout):
        """Wait up to `timeout` for news; return the text that continues exactly at `sent`. Deltas
        past a gap are kept for after the follower's next row read."""
        with self._cond:
            self._cond.wait_for(lambda: self._fresh, timeout)
            deltas, self._deltas, self._fresh = self._deltas, [], False
            ended = self._ended
        pieces, position, gap, kept = [], sent, False, []
        for offset, text in sorted(deltas, key=lambda delta: delta[0]):
            if text is None or offset > position:
                gap = True
                if text is not None:
                    kept.append((offset, text))
            elif offset + len(text) > position:
                pieces.append(text[position - offset:])
                position = offset + len(text)
        if kept:
            with self._cond:
                self._deltas[:0] = kept
        return Pushed("".join(pieces), gap, ended)

    def announce(self):
        """Tell the generating worker (wherever it is) that this answer has a follower here: one
        NOTIFY through the request's pool connection, at once; the hub renews it from then on."""
        self.hub.announced(self.message_id)
        db.session.execute(sql("SELECT pg_notify(:channel, :payload)"),
                           {"channel": FOLLOW, "payload": str(self.message_id)})
        db.session.commit()

    def close(self):
        self.hub.unsubscribe(self)


class Hub:
    """Per worker process: the listening connection, the followers here, the interest of others."""

    def __init__(self, app):
        self.app = app
        self._lock = threading.Lock()
        self._subscriptions = {}  # message id -> set of Subscription (followers in this process)
        self._announced = set()   # message ids whose interest this process renews
        self._interest = {}       # message id -> monotonic deadline (followers elsewhere)
        self._published = {}      # message id -> offset published so far (answers generated here)
        self._seen = set()        # answers generating here at the last tick
        self._gone = {}           # message id -> when it stopped generating here (recently)
        self.notifies_sent = 0
        self.stopped = False

    # ---- followers in this process --------------------------------------------------------------

    def subscribe(self, message_id):
        subscription = Subscription(self, message_id)
        with self._lock:
            self._subscriptions.setdefault(message_id, set()).add(subscription)
        return subscription

    def announced(self, message_id):
        with self._lock:
            self._announced.add(message_id)

    def unsubscribe(self, subscription):
        with self._lock:
            followers = self._subscriptions.get(subscription.message_id)
            if followers is not None:
                followers.discard(subscription)
                if not followers:
                    del self._subscriptions[subscription.message_id]
                    self._announced.discard(subscription.message_id)

    # ---- the one background task ----------------------------------------------------------------

    def run(self):
        while not self.stopped:
            try:
                self._serve()
            except Exception:  # the database restarted or the connection dropped: followers fall back
                log.exception("push listener failed; reconnecting")  # to the row until it is back
                time.sleep(1.0)

    def stop(self):
        """End the task within about IDLE_WAIT (tests; a worker simply exits)."""
        self.stopped = True

    def _connect(self):
        with self.app.app_context():
            url = db.engine.url
            args, kwargs = db.engine.dialect.create_connect_args(url)
        return psycopg.connect(*args, **kwargs, autocommit=True)

    def _serve(self):
        with self._connect() as conn:
            conn.execute(f"LISTEN {DELTAS}")
            conn.execute(f"LISTEN {FOLLOW}")
            log.info("push: listening for answer deltas")
            last_publish = last_renew = 0.0
            while not self.stopped:
                now = time.monotonic()
                wait = IDLE_WAIT
                if self._has_work():
                    wait = max(0.0, last_publish + TICK_SECONDS - now)
                with self._lock:
                    if self._announced:
                        wait = min(wait, max(0.0, last_renew + RENEW_SECONDS - now))
                for notify in conn.notifies(timeout=wait, stop_after=1):
                    self._received(notify)
                now = time.monotonic()
                if now - last_publish >= TICK_SECONDS:
                    last_publish = now
                    self._publish(conn)
                if now - last_renew >= RENEW_SECONDS:
                    last_renew = now
                    self._renew(conn)

    def _received(self, notify):
        try:
            if notify.channel == FOLLOW:
                deadline = time.monotonic() + INTEREST_SECONDS
                with self._lock:
                    for raw in notify.payload.split(","):
                        self._interest[int(raw)] = deadline
                return
            payload = json.loads(notify.payload)
        except ValueError:
            log.warning("push: ignored a malformed notification on %s", notify.channel)
            return
        with self._lock:
            targets = [(subscription, delta) for delta in payload.get("d", ())
                       for subscription in self._subscriptions.get(delta[0], ())]
            ends = [subscription for message_id in payload.get("e", ())
                    for subscription in self._subscriptions.get(message_id, ())]
        for subscription, (_, offset, text) in targets:
            subscription.put(offset, text)
        for subscription in ends:
            subscription.end()

    def _lives(self):
        registry = self.app.extensions.get("generations")
        return dict(registry._live) if registry is not None else {}

    def _has_work(self):
        with self._lock:
            return bool(self._interest or self._published)

    def _publish(self, conn):
        """One NOTIFY (or none) with every new piece of every followed answer generated here."""
        lives, now = self._lives(), time.monotonic()
        deltas, ended = [], []
        for message_id in self._seen - lives.keys():
            self._gone[message_id] = now
        self._seen = set(lives)
        for message_id, when in list(self._gone.items()):
            if now - when > INTEREST_SECONDS:
                del self._gone[message_id]
        with self._lock:
            for message_id, deadline in list(self._interest.items()):
                if deadline < now:
                    del self._interest[message_id]
                elif message_id in self._gone and message_id not in self._published:
                    ended.append(message_id)  # it ended here just before the follower's interest came
                    del self._gone[message_id]
            for message_id in list(self._published):
                if message_id not in lives:
                    ended.append(message_id)  # finished: its final row is committed already
                    del self._published[message_id]
                elif message_id not in self._interest:
                    del self._published[message_id]  # nobody follows it any more
            for message_id in self._interest:
                live = lives.get(message_id)
                if live is None:
                    continue
                offset, text = self._published.get(message_id, 0), live.text
                if len(text) > offset or message_id not in self._published:
                    deltas.append([message_id, offset, text[offset:]])
                    self._published[message_id] = len(text)
        if deltas or ended:
            self._notify(conn, DELTAS, fit({"d": deltas, "e": ended}))

    def _renew(self, conn):
        with self._lock:
            ids = [str(message_id) for message_id in self._announced]
        while ids:
            batch, size = [], 0
            while ids and size + len(ids[-1]) + 1 < PAYLOAD_MAX:
                batch.append(ids.pop())
                size += len(batch[-1]) + 1
            self._notify(conn, FOLLOW, ",".join(batch))

    def _notify(self, conn, channel, payload):
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        self.notifies_sent += 1


def fit(payload):
    """The JSON of a deltas payload, within PAYLOAD_MAX bytes: the largest texts are dropped (sent as
    null, "read the row") until it fits."""
    def encoded(value):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    body = encoded(payload)
    by_size = sorted((delta for delta in payload["d"] if delta[2]), key=lambda delta: len(delta[2]))
    while len(body.encode()) >= PAYLOAD_MAX and by_size:
        by_size.pop()[2] = None
        body = encoded(payload)
    while len(body.encode()) >= PAYLOAD_MAX and payload["e"]:
        payload["e"].pop()  # thousands of ends in one tick: those followers find out on their safety read
        body = encoded(payload)
    return body


# ---- the extension-like entry points ----------------------------------------------------------------

def start(app):
    """In a served process (gunicorn's post_worker_init), on PostgreSQL: the hub and its task."""
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        return None  # SQLite: followers poll the row
    hub = Hub(app)
    app.extensions["push"] = hub
    spawn(hub.run, name="push-hub")
    return hub


def subscribe(message_id):
    """A Subscription for a follower in this process, or None where push is off (SQLite, tests'
    in-process apps): then the follower polls the row."""
    from flask import current_app
    hub = current_app.extensions.get("push")
    return hub.subscribe(message_id) if hub is not None else None
