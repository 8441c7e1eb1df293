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

from flask import current_app, g, has_request_context
from sqlalchemy import delete, func, insert, select

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


def needs_guard(user):
    """Whether take_turn has anything to do for this person (a limit is on)."""
    return any(limits_of(user))


def take_turn(user):
    """In the caller's transaction, before the answer row is added: refuse with 429 (and a
    Retry-After) if this person is over a limit, else count the start. Three statements (the lock,
    one SELECT, the INSERT of the start); none when both limits are off."""
    max_running, per_minute = limits_of(user)
    if not max_running and not per_minute:
        return
    answers.lock(USER_LOCK, user.id)
    now, key = time.time(), _key(user.id)
    mine = HITS.c.key == key
    unfinished, started, oldest, expired = db.session.execute(select(
        select(func.count()).select_from(Message).join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.status.in_(ACTIVE_STATUSES), Conversation.user_id == user.id).scalar_subquery(),
        select(func.count()).where(mine, HITS.c.at > now - WINDOW).scalar_subquery(),
        select(func.min(HITS.c.at)).where(mine, HITS.c.at > now - WINDOW).scalar_subquery(),
        select(func.count()).where(mine, HITS.c.at <= now - WINDOW).scalar_subquery())).one()
    if max_running and unfinished >= max_running:
        db.session.rollback()
        raise ServiceError(429, "too_many_answers",
                           f"you already have {unfinished} answer{'s' if unfinished != 1 else ''} being "
                           f"generated (at most {max_running} at once); wait for one to finish",
                           retry_after=BUSY_RETRY_AFTER)
    if per_minute and started >= per_minute:
        db.session.rollback()
        wait = max(1, math.ceil(oldest + WINDOW - now))
        raise ServiceError(429, "too_many_answers",
                           f"at most {per_minute} answers a minute; try again in {wait} seconds", retry_after=wait)
    if expired >= max(per_minute, 1):  # tidy up now and then, not on every turn
        db.session.execute(delete(HITS).where(mine, HITS.c.at <= now - WINDOW))
    db.session.execute(insert(HITS).values(key=key, at=now, expires_at=now + WINDOW))
