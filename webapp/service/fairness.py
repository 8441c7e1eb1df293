"""Fairness in front of the model, per person: at most USER_MAX_RUNNING unfinished answers at once
(queued ones count: a person cannot fill the model's queue either) and USER_MAX_PER_MINUTE answers
started per minute; 0 turns either off, and an admin's per-person override (users.max_running,
users.max_per_minute, set with `flask set-limits`) wins over the configured default.

Both are counted in the database inside the turn's own transaction, under a per-person lock
(answers.lock: an advisory lock on PostgreSQL, the single writer on SQLite), and before the answer
row is added: of any number of simultaneous turns, exactly as many as the limit start, on every
worker and replica alike; a turn that fails later (busy conversation, unknown model) rolls its count
back with it. Started answers are counted as rows of rate_limit_hits (the sign-in limits' table, a
key of their own), so counting a minute is one index range scan whatever the person's history."""
import hashlib
import math
import time
from dataclasses import dataclass

from flask import current_app, g, has_request_context
from sqlalchemy import Integer, and_, bindparam, case, delete, func, insert, literal, or_, select

from .. import answers
from ..errors import ServiceError
from ..extensions import db
from ..models import ACTIVE_STATUSES, Conversation, Message, RateLimitHit

USER_LOCK = 7142  # advisory-lock namespace: (USER_LOCK, hashtext(user id))
WINDOW = 60.0     # seconds: "per minute"
BUSY_RETRY_AFTER = 5  # seconds to suggest when too many answers are unfinished
HITS = RateLimitHit.__table__


def limits_of(user):
    """(max unfinished answers, max started per minute) for this call; 0 = no limit. The first that
    is set wins: the API key's override (a call made with a personal key), the person's, the
    configured default. The counts stay the person's: a key can be held tighter, never escape them
    by being several keys."""
    config = current_app.config
    key_running, key_per_minute = (g.get("api_key_limits") or (None, None)) if has_request_context() else (None, None)
    running = _first(key_running, user.max_running, config["USER_MAX_RUNNING"])
    per_minute = _first(key_per_minute, user.max_per_minute, config["USER_MAX_PER_MINUTE"])
    return max(0, running), max(0, per_minute)


def _first(*values):
    return next(value for value in values if value is not None)


def _key(user_id):
    return hashlib.sha256(f"answers-started:{user_id}".encode()).hexdigest()


def _counts(user_id, key, since, max_running, per_minute):
    """The row take_turn decides on: this person's unfinished answers, the starts counted since
    `since` (and the oldest of them: when one leaves the window), and the expired ones to tidy. A
    count whose limit is off is not made (None): a person with no per-minute limit may start hundreds
    a minute, and counting them on every turn would cost more than the turn."""
    mine = HITS.c.key == key

    def unless_off(limit, count):
        return case((limit == 0, None), else_=count)
    # The answers unfinished right now, server-wide (a small partial index), each looked up by its
    # conversation's key: left to itself, PostgreSQL's planner may walk all of the person's
    # conversations instead, each turn costing more as their history grows (3.5 ms at 1,600).
    owner = (select(Conversation.user_id).where(Conversation.id == Message.conversation_id)
             .correlate(Message).scalar_subquery())
    return (
        unless_off(max_running, select(func.count()).select_from(Message)
                   .where(_active, owner == user_id).scalar_subquery()).label("unfinished"),
        unless_off(per_minute, select(func.count()).where(mine, HITS.c.at > since).scalar_subquery()).label("started"),
        unless_off(per_minute, select(func.min(HITS.c.at)).where(mine, HITS.c.at > since).scalar_subquery())
        .label("oldest"),
        select(func.count()).where(mine, HITS.c.at <= since).scalar_subquery().label("expired"))


# Equalities, not in_(): an IN list of constants is an expanding parameter, which keeps the guarded
# starts on SQLAlchemy's path (webapp/direct_sql.py); the partial index's predicate is implied either way.
_active = or_(*(Message.status == status for status in ACTIVE_STATUSES))


def _refusal(max_running, per_minute, unfinished, started, oldest, now):
    """The 429 for a turn over a limit, or None."""
    if max_running and unfinished >= max_running:
        return ServiceError(429, "too_many_answers",
                            f"you already have {unfinished} answer{'s' if unfinished != 1 else ''} being "
                            f"generated (at most {max_running} at once); wait for one to finish",
                            retry_after=BUSY_RETRY_AFTER)
    if per_minute and started >= per_minute:
        wait = max(1, math.ceil(oldest + WINDOW - now))
        return ServiceError(429, "too_many_answers",
                            f"at most {per_minute} answers a minute; try again in {wait} seconds", retry_after=wait)
    return None


def take_turn(user):
    """In the caller's transaction, before the answer row is added: refuse with 429 (and a
    Retry-After) if this person is over a limit, else count the start. Three statements (the lock,
    one SELECT, the INSERT of the start); none when both limits are off."""
    max_running, per_minute = limits_of(user)
    if not max_running and not per_minute:
        return
    answers.lock(USER_LOCK, user.id)
    now, key = time.time(), _key(user.id)
    unfinished, started, oldest, expired = db.session.execute(select(
        *_counts(user.id, key, now - WINDOW, literal(max_running), literal(per_minute)))).one()
    refused = _refusal(max_running, per_minute, unfinished, started, oldest, now)
    if refused is not None:
        db.session.rollback()
        raise refused
    if expired >= max(per_minute, 1):  # tidy up now and then, not on every turn
        db.session.execute(delete(HITS).where(HITS.c.key == key, HITS.c.at <= now - WINDOW))
    db.session.execute(insert(HITS).values(key=key, at=now, expires_at=now + WINDOW))


@dataclass(frozen=True)
class Guard:
    """take_turn folded into a turn's one-statement start (answers.open_in_new_conversation,
    answers.continue_conversation): the lock to take first, the guarded statements ("new",
    "new_after", "next") and their parameters, and `check(row)`, which raises the refusal a
    statement reported. The same rule as take_turn, decided inside the statement: the counts, the
    tidy-up and the start's row are written only where the limits allow (and the turn went ahead)."""
    statements: dict
    lock: tuple
    params: dict
    max_running: int
    per_minute: int
    now: float

    def check(self, row):
        unfinished, started, oldest = row
        refused = _refusal(self.max_running, self.per_minute, unfinished, started, oldest, self.now)
        if refused is not None:
            raise refused


def guard_for(user, limits=None):
    """The Guard of this person's next start, for the one-statement starts; None when no limit is on.
    `limits`: (max unfinished, max per minute) to use instead of limits_of(user), 0 = off (a statement
    already chosen as guarded: service.token_check)."""
    max_running, per_minute = limits if limits is not None else limits_of(user)
    if limits is None and not max_running and not per_minute:
        return None
    now = time.time()
    params = {"g_user": user.id, "g_key": _key(user.id), "g_since": now - WINDOW, "g_now": now,
              "g_expires": now + WINDOW, "g_max_running": max_running, "g_per_minute": per_minute}
    return Guard(GUARDED, answers.lock_statement(USER_LOCK, user.id), params, max_running, per_minute, now)


class _GuardSQL:
    """take_turn's rule as SQL, for one statement of answers': `allowed` (a boolean the statement's
    writes require), `report` (the counts it decided on, returned), and `writes(done)`, the tidy-up
    and the start's row, written only where allowed and `done` (the turn went ahead) hold. The
    counts are one CTE, read once."""

    def __init__(self):
        self.max_running = bindparam("g_max_running", type_=Integer)
        self.per_minute = bindparam("g_per_minute", type_=Integer)
        self.counts = select(*_counts(bindparam("g_user"), bindparam("g_key"), bindparam("g_since"),
                                      self.max_running, self.per_minute)).cte("counts")
        self.allowed = select(and_(or_(self.max_running == 0, self.counts.c.unfinished < self.max_running),
                                   or_(self.per_minute == 0, self.counts.c.started < self.per_minute))
                              ).scalar_subquery()
        self.report = [select(column).scalar_subquery()
                       for column in (self.counts.c.unfinished, self.counts.c.started, self.counts.c.oldest)]

    def writes(self, done):
        key, since = bindparam("g_key", type_=HITS.c.key.type), bindparam("g_since", type_=HITS.c.at.type)
        expired = select(self.counts.c.expired).scalar_subquery()
        tidy = delete(HITS).where(HITS.c.key == key, HITS.c.at <= since, self.allowed, done,
                                  expired >= func.greatest(self.per_minute, 1)).cte("tidy")
        start = insert(HITS).from_select(["key", "at", "expires_at"], select(
            key, bindparam("g_now", type_=HITS.c.at.type), bindparam("g_expires", type_=HITS.c.expires_at.type))
            .where(self.allowed, done)).cte("start")
        return tidy, start


GUARDED = {"new": answers.open_new_statement(_GuardSQL()),
           "new_after": answers.open_new_statement(_GuardSQL(), earlier=True),
           "next": answers.open_next_statement(_GuardSQL())}
