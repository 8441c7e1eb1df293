"""An answer's life, start to end, in the database: the one writer of a conversation's busy flag
(`active_message_id`) and of an answer's final status.

    open_answer  -> the answer row exists and its conversation is claimed (one turn at a time);
                    with the queue on (LLM_MAX_PARALLEL) it starts 'queued'
    admit        -> queued answers take a free slot at their model, fairly across people
    flush        -> the text so far is saved (throttled by the generator; the first flush also marks
                    the answer 'streaming')
    finish       -> the final status, text and usage are saved and the conversation freed, together
    orphans      -> an answer whose worker died (stale heartbeat) is saved as 'interrupted'

It knows nothing of threads, generators or requests. "Is this answer being generated in this process
right now?" is asked through `is_live`, a callable handed in by whoever runs generations (see
webapp/generation.py), so this module never imports them.
"""
import functools
import logging
import time
from collections import Counter
from datetime import timedelta

from flask import current_app
from sqlalchemy import (
    ARRAY,
    Integer,
    Text,
    any_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.orm.attributes import set_committed_value

from .errors import ServiceError, not_found
from .extensions import db, execute_alone, execute_write
from .models import (
    ACTIVE_STATUSES,
    COMPLETE,
    INTERRUPTED,
    PENDING,
    QUEUED,
    RUNNING_STATUSES,
    STREAMING,
    Conversation,
    IdempotencyKey,
    Message,
    detached,
    stored_text,
    utcnow,
)

log = logging.getLogger(__name__)
INTERRUPTED_MESSAGE = "the server restarted while generating this answer; retry to generate it again"
SAVE_ATTEMPTS = 3

# The tables themselves, for the statements every answer runs: Core skips the ORM's unit of work and
# bulk machinery (resolving attributes, syncing the identity map), which cost more than the
# statements, and the statements of every turn are built once (building and keying one costs as
# much as the database's work on it); parameters are named b_* (a column's own name is reserved in SET).
MESSAGES, CONVERSATIONS = Message.__table__, Conversation.__table__
_INSERT_MESSAGES = insert(MESSAGES).returning(MESSAGES.c.id, sort_by_parameter_order=True)
_CLAIM = update(CONVERSATIONS).where(
    CONVERSATIONS.c.id == bindparam("b_conversation_id"), CONVERSATIONS.c.active_message_id.is_(None)).values(
    active_message_id=bindparam("b_answer_id"), message_count=bindparam("b_message_count"),
    updated_at=bindparam("b_now"))
_RELEASE_WHERE = (CONVERSATIONS.c.id == bindparam("b_conversation_id"),
                  CONVERSATIONS.c.active_message_id == bindparam("b_message_id"))
_RELEASE = update(CONVERSATIONS).where(*_RELEASE_WHERE).values(active_message_id=None)
_RELEASE_AT = update(CONVERSATIONS).where(*_RELEASE_WHERE).values(active_message_id=None,
                                                                  updated_at=bindparam("b_now"))


def _never_live(message_id):
    return False


# ---- start ------------------------------------------------------------------------------------------

def open_answer(conversation, model, request_id, prompt=None, replaces=None, is_live=_never_live,
                queued=False, guard=None, earlier=()):
    """In the caller's transaction: add the prompt (if any) and an empty answer, and claim the
    conversation with a compare-and-set on its busy flag. Nothing is committed here. Returns
    (prompt_message, answer), copies of the rows as written (not tracked by the session); raises
    409 when another answer is running (or 404 if it vanished).
    An answer orphaned by a dead worker does not block: it is saved as interrupted, and the claim
    tried once more. `replaces`: the id of an answer the new one takes the place of (regenerate).
    `queued`: the answer waits for a slot at the model (see `admit`). `guard()`: run at the start of
    each attempt's transaction (the per-person limits take their lock and count there).
    `earlier`: [(role, content)] stored complete before the prompt (/v1's messages past the stored
    path). They are part of every attempt's rows: a failed claim's rollback takes them away, so
    rows added by the caller beforehand would be lost on the retry."""
    for attempt in range(2):
        if guard is not None:
            guard()
        now = utcnow()
        rows = [_row(conversation.id, role, content, COMPLETE, None, request_id, None, now)
                for role, content in earlier]
        if prompt is not None:
            rows.append(_row(conversation.id, "user", prompt, COMPLETE, None, request_id, None, now))
        rows.append(_row(conversation.id, "assistant", "", QUEUED if queued else PENDING, model, request_id, now, now))
        count = conversation.message_count + len(rows)
        added = _insert_messages(rows)
        answer = added[-1]
        if replaces is not None:
            # A late retry of the request that made the replaced answer finds the one that took its
            # place, not a freed key (deleting the old row would cascade to its key).
            db.session.execute(update(IdempotencyKey).where(IdempotencyKey.message_id == replaces)
                               .values(message_id=answer.id))
            count -= db.session.execute(delete(Message).where(Message.id == replaces)).rowcount
        if _claim(conversation.id, answer.id, count, now):
            for name, value in (("active_message_id", answer.id), ("message_count", count), ("updated_at", now)):
                set_committed_value(conversation, name, value)
            return (added[-2] if prompt is not None else None), answer
        conversation_id = conversation.id
        db.session.rollback()
        if db.session.scalar(select(Conversation.id).where(Conversation.id == conversation_id)) is None:
            raise not_found("conversation", "conversation_id")  # deleted meanwhile
        if attempt or not free_if_orphaned(conversation_id, is_live):
            break
    raise ServiceError(409, "conversation_busy", "an answer is already being generated in this conversation; "
                                                 "wait for it or stop it first")


def open_in_new_conversation(values, model, request_id, prompt, queued=False, guard=None, earlier=()):
    """A turn that starts a conversation, on PostgreSQL with no transaction open and no
    Idempotency-Key: the conversation, the prompt and the answer written and the conversation claimed
    in ONE statement on a connection in autocommit, so it is its own transaction (all or nothing, as
    open_answer's BEGIN ... COMMIT) in one round trip instead of five. A new conversation cannot be
    busy, so the claim is simply its active_message_id.
    `values`: the conversation's columns (service.conversations.conversation_values).
    `guard`: the per-person limits folded in (service.fairness.Guard): its lock is taken first in a
    transaction of the statement's own (BEGIN, lock, the statement, COMMIT), its check decides inside
    the statement whether anything is written, and `guard.check(row)` raises the refusal.
    `earlier`: [(role, content)] written complete before the prompt (/v1's history), as open_answer's.
    Returns (conversation, prompt_message, answer) copies as open_answer does, or None where this
    does not apply: the caller takes the general path."""
    now = values["created_at"]
    rows = [_row(None, "user", prompt, COMPLETE, None, request_id, None, now),
            _row(None, "assistant", "", QUEUED if queued else PENDING, model, request_id, now, now)]
    params = {**{"c_" + name: values[name] for name in _NEW_CONVERSATION_COLUMNS},
              "p_content": rows[0]["content"], "a_status": rows[1]["status"], "a_model": model,
              "b_request_id": request_id, "b_now": now}
    kind = "new"
    if earlier:
        kind = "new_after"
        params["e_roles"] = [role for role, _ in earlier]
        params["e_contents"] = [stored_text(content) for _, content in earlier]
    rows_written = _run_guarded(kind, params, guard)
    if rows_written is None:
        return None
    (conversation_id, prompt_id, answer_id, *checks), = rows_written
    if guard is not None:
        guard.check(checks)
    if answer_id is None:  # the guard held it back without a refusal of its own (service.token_check)
        return None
    conversation = detached(Conversation, id=conversation_id, **{**values, "message_count": len(earlier) + 2,
                                                                 "active_message_id": answer_id})
    prompt_row, answer_row = ({**row, "conversation_id": conversation_id} for row in rows)
    return conversation, detached(Message, id=prompt_id, **prompt_row), detached(Message, id=answer_id, **answer_row)


def _run_guarded(kind, params, guard):
    """One of the one-statement starts (_STARTS[kind]), alone: as it is, or with the guard's lock taken
    first and its own version of the statement (guard.statements[kind]) in a transaction of their own."""
    if guard is None:
        return execute_alone(_STARTS[kind], params)
    extra = guard.params  # or a function of what its lock statement read (service.token_check)
    merged = (lambda ahead: {**params, **extra(ahead)}) if callable(extra) else {**params, **extra}
    return execute_alone(guard.statements[kind], merged, first=guard.lock)


def continue_conversation(user_id, conversation_id, prompt, model, keep_model, request_id, queued=False,
                          guard=None):
    """A turn in an existing conversation, on PostgreSQL with no transaction open and no
    Idempotency-Key: the claim comes first, in ONE statement with the prompt and the answer (the
    same all-or-nothing transaction as open_answer's, in one round trip instead of six). Their ids
    are drawn from the sequence first (prompt before answer), so the claim can point at the answer.
    `model`: the answer's (None: the conversation's); `keep_model`: it becomes the conversation's too.
    `guard`: the per-person limits, as open_in_new_conversation's (the start is counted only when
    the claim is made). Returns (conversation, prompt_message, answer) copies, or None when the claim
    was not made (no such conversation of this person, busy, perhaps orphaned): the caller takes the
    general path, which says why or frees an orphan and claims."""
    now = utcnow()
    rows = [_row(conversation_id, "user", prompt, COMPLETE, None, request_id, None, now),
            _row(conversation_id, "assistant", "", QUEUED if queued else PENDING, model, request_id, now, now)]
    params = {"b_conversation_id": conversation_id, "b_user_id": user_id, "b_now": now, "b_request_id": request_id,
              "c_model": model if keep_model else None, "p_content": rows[0]["content"],
              "a_status": rows[1]["status"], "a_model": model}
    rows_written = _run_guarded("next", params, guard)
    if rows_written is None:
        return None
    (prompt_id, answer_id, *values), = rows_written
    claimed, checks = values[:len(_CLAIMED_COLUMNS)], values[len(_CLAIMED_COLUMNS):]
    if guard is not None:
        guard.check(checks)
    if answer_id is None:
        return None
    conversation = detached(Conversation, **dict(zip(_CLAIMED_COLUMNS, claimed, strict=True)), updated_at=now,
                            active_message_id=answer_id)
    rows[1]["model"] = conversation.model if model is None else model
    return conversation, detached(Message, id=prompt_id, **rows[0]), detached(Message, id=answer_id, **rows[1])


def _labelled(values):
    # Every column labelled: unlabelled, SQLAlchemy would take two NULLs for one column.
    return [value.label(name) for name, value in values.items()]


def _message_values(m, role, content, status, model, heartbeat_at, **more):
    return {**more, "role": literal(role, m.role.type), "content": content, "status": status, "model": model,
            "request_id": bindparam("b_request_id", type_=m.request_id.type), "heartbeat_at": heartbeat_at,
            "created_at": bindparam("b_now", type_=m.created_at.type), "cancel_requested": false()}


def open_new_statement(guard=None, earlier=False):
    """open_in_new_conversation's statement: the conversation's id drawn first (nextval), so the
    messages can point at it and it at its answer within one statement (the messages' foreign key
    is checked at the statement's end); the rows go in ordered, prompt before answer, as
    SQLAlchemy's own ordered multi-row INSERT relies on. Returns (conversation id, prompt id,
    answer id, *guard.report). `guard`: service.fairness's SQL of the per-person limits; the rows
    are written only where `guard.allowed` holds, and its writes (counting the start) with them.
    `earlier`: the statement also writes, before the prompt and complete, the messages given as the
    arrays e_roles and e_contents (in order: unnest's ordinality)."""
    m, c = MESSAGES.c, CONVERSATIONS.c
    new_id = select(func.nextval(func.pg_get_serial_sequence("conversations", "id")).label("id")).cte("new_id")
    when = (guard.allowed,) if guard is not None else ()

    def message(order, role, content, status, model, heartbeat_at):
        values = _message_values(m, role, content, status, model, heartbeat_at, conversation_id=new_id.c.id)
        return select(literal(0).label("part"), literal(order).label("ord"), *_labelled(values))
    parts = [message(1, "user", bindparam("p_content", type_=m.content.type), literal(COMPLETE, m.status.type),
                     null(), null()),
             message(2, "assistant", literal("", m.content.type), bindparam("a_status", type_=m.status.type),
                     bindparam("a_model", type_=m.model.type), bindparam("b_now", type_=m.heartbeat_at.type))]
    if earlier:
        given = func.unnest(bindparam("e_roles", type_=ARRAY(m.role.type)),
                            bindparam("e_contents", type_=ARRAY(Text()))).table_valued(
            "role", "content", with_ordinality="ord").render_derived()
        # A cross join with the one-row new_id: every given message points at the new conversation.
        values = {**_message_values(m, "", given.c.content, literal(COMPLETE, m.status.type), null(), null(),
                                    conversation_id=new_id.c.id), "role": given.c.role}
        # Last in the UNION (the ORDER BY puts them first): its NULLs take the answer's column types.
        parts.append(select(literal(-1).label("part"), given.c.ord.label("ord"), *_labelled(values))
                     .join_from(given, new_id, true()))
    rows = union_all(*parts).subquery()
    columns = [m.conversation_id, m.role, m.content, m.status, m.model, m.request_id, m.heartbeat_at, m.created_at,
               m.cancel_requested]
    added = insert(MESSAGES).from_select(columns, select(*list(rows.c)[2:]).where(*when).order_by(
        rows.c.part, rows.c.ord)).returning(m.id).cte("added")
    last, count = (select(aggregate(added.c.id)).scalar_subquery() for aggregate in (func.max, func.count))
    names = _NEW_CONVERSATION_COLUMNS
    conversation = insert(CONVERSATIONS).from_select(
        [c.id, c.message_count, c.active_message_id, *(c[name] for name in names)],
        select(new_id.c.id, count, last,
               *(bindparam("c_" + name, type_=c[name].type) for name in names)).where(*when)).cte("conversation")
    report, writes = (guard.report, guard.writes(true())) if guard is not None else ((), ())
    prompt = select(func.max(added.c.id)).where(added.c.id < last).scalar_subquery()
    return select(new_id.c.id, prompt, last, *report).add_cte(conversation, *writes)


def open_next_statement(guard=None):
    """continue_conversation's statement: two message ids drawn in order, the claim (a compare-and-set
    on the busy flag, this person's conversation only) pointing at the second, and the prompt and
    the answer inserted only where the claim was made. Returns (prompt id, answer id, the claimed
    conversation's _CLAIMED_COLUMNS, *guard.report): the ids are NULL when nothing was written."""
    m, c = MESSAGES.c, CONVERSATIONS.c
    ids = select(func.nextval(func.pg_get_serial_sequence("messages", "id")).label("id")).select_from(
        func.generate_series(1, 2)).cte("ids")
    first, second = (select(aggregate(ids.c.id)).scalar_subquery() for aggregate in (func.min, func.max))
    claimed = update(CONVERSATIONS).where(
        c.id == bindparam("b_conversation_id"), c.user_id == bindparam("b_user_id"), c.active_message_id.is_(None),
        *((guard.allowed,) if guard is not None else ())).values(
        active_message_id=second, message_count=c.message_count + 2, updated_at=bindparam("b_now"),
        model=func.coalesce(bindparam("c_model", type_=c.model.type), c.model)).returning(
        *(c[name] for name in _CLAIMED_COLUMNS)).cte("claimed")
    answer_model = func.coalesce(bindparam("a_model", type_=m.model.type), claimed.c.model)
    both = union_all(
        select(*_labelled(_message_values(
            m, "user", bindparam("p_content", type_=m.content.type), literal(COMPLETE, m.status.type), null(), null(),
            id=first, conversation_id=claimed.c.id))),
        select(*_labelled(_message_values(
            m, "assistant", literal("", m.content.type), bindparam("a_status", type_=m.status.type), answer_model,
            bindparam("b_now", type_=m.heartbeat_at.type), id=second, conversation_id=claimed.c.id)))).subquery()
    added = insert(MESSAGES).from_select(list(both.c.keys()), select(*both.c).order_by(both.c.id)).returning(
        m.id).cte("added")
    report, writes = (guard.report, guard.writes(exists(select(claimed.c.id)))) if guard is not None else ((), ())
    return select(select(func.min(added.c.id)).scalar_subquery(), select(func.max(added.c.id)).scalar_subquery(),
                  *(select(claimed.c[name]).scalar_subquery() for name in _CLAIMED_COLUMNS), *report
                  ).add_cte(claimed, *writes)


_NEW_CONVERSATION_COLUMNS = ("user_id", "title", "model", "system_prompt", "source", "created_at", "updated_at")
_CLAIMED_COLUMNS = ("id", "user_id", "title", "model", "system_prompt", "message_count", "source", "created_at")
# The one-statement starts without a guard; service.fairness builds the guarded ones, by the same kinds.
_STARTS = {"new": open_new_statement(), "new_after": open_new_statement(earlier=True), "next": open_next_statement()}


def _row(conversation_id, role, content, status, model, request_id, heartbeat_at, now):
    return {"conversation_id": conversation_id, "role": role, "content": stored_text(content), "status": status,
            "model": model, "request_id": request_id, "heartbeat_at": heartbeat_at, "created_at": now,
            "cancel_requested": False}


def _insert_messages(rows):
    """One INSERT for the rows (dicts with the same keys), in order; returns Message copies with their ids."""
    ids = db.session.execute(_INSERT_MESSAGES, rows).scalars().all()
    return [detached(Message, id=message_id, **row) for message_id, row in zip(ids, rows, strict=True)]


def _claim(conversation_id, answer_id, message_count, now):
    return db.session.execute(_CLAIM, {"b_conversation_id": conversation_id, "b_answer_id": answer_id,
                                       "b_message_count": message_count, "b_now": now}).rowcount == 1


# ---- the queue in front of the model ----------------------------------------------------------------

QUEUE_LOCK = 7141  # PostgreSQL advisory-lock namespace: (QUEUE_LOCK, hashtext(model)) guards one model's slots


def lock(namespace, key):
    """Serialise a read-then-write with everyone else doing the same for `key`, until the caller's
    transaction ends. PostgreSQL: a transaction-scoped advisory lock. SQLite: the database's single
    writer: a write that touches nothing makes the session's transaction take the write lock first
    (BEGIN IMMEDIATE, see capacity.py), so what it reads next cannot change under it."""
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(*lock_statement(namespace, key))
    else:
        db.session.execute(update(Message).where(Message.id == -1).values(status=QUEUED))


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:namespace, hashtext(:key))")


def lock_with(rows):
    """lock_statement's statement (the same parameters), taking the lock for each row of `rows` (a
    CTE of one row, or none: then no lock) and returning them: a row read and a lock taken in one
    round trip (service.token_check)."""
    return select(func.pg_advisory_xact_lock(bindparam("namespace"), func.hashtext(bindparam("key"))).label("locked"),
                  *rows.c)


def lock_statement(namespace, key):
    """PostgreSQL's form of `lock`, as (statement, params), for a transaction run outside the session."""
    return _ADVISORY_LOCK, {"namespace": namespace, "key": str(key)}


def model_key(name):
    """One queue per model, however it is spelt: Ollama reads 'tinyllama' as 'tinyllama:latest'."""
    return name if ":" in name else name + ":latest"


def _spellings(key):
    return [key, key[:-len(":latest")]] if key.endswith(":latest") else [key]


def _queue_of(model):
    """(fair order of the queued answer ids, how many run) for one model. Round-robin across
    people: an answer's rank is how many answers its person already has running or queued ahead
    of it at this model, so everyone's first waiting answer goes before anyone's second."""
    rows = db.session.execute(
        select(Message.id, Message.status, Conversation.user_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.status.in_(ACTIVE_STATUSES), Message.model.in_(_spellings(model_key(model))))
        .order_by(Message.id)).all()
    per_person = Counter(user_id for _, status, user_id in rows if status in RUNNING_STATUSES)
    running = sum(per_person.values())
    ranked = []
    for message_id, status, user_id in rows:
        if status == QUEUED:
            ranked.append((per_person[user_id], message_id))
            per_person[user_id] += 1
    return [message_id for _, message_id in sorted(ranked)], running


def admit(waiting, limit):
    """Give free slots to queued answers, in fair order. `waiting`: {model_key(model): ids of queued
    answers this process runs}; only those are admitted here (a head of the line that another worker runs is
    admitted by that worker's next tick). One short transaction, under each model's lock, so workers
    and replicas never run more than `limit` answers of a model at once. Returns {id: place in line},
    0 for the answers admitted now (now 'pending'); an id missing from the result is no longer queued."""
    places = {}
    try:
        for model in sorted(waiting):
            lock(QUEUE_LOCK, model_key(model))
            order, running = _queue_of(model)
            free = max(0, limit - running)
            mine = waiting[model]
            now_running = [message_id for message_id in order[:free] if message_id in mine]
            if now_running:
                db.session.execute(update(Message).where(Message.id.in_(now_running), Message.status == QUEUED)
                                   .values(status=PENDING, heartbeat_at=utcnow()))
            for index, message_id in enumerate(order):
                if message_id in mine:
                    places[message_id] = 0 if message_id in now_running else index + 1
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return places


def place_in_line(message_id, model):
    """1 for the next answer to run, 2 for the one after, ... (None when it is not queued). A read
    for followers on other workers; no lock."""
    order, _ = _queue_of(model)
    db.session.rollback()
    return order.index(message_id) + 1 if message_id in order else None


# ---- while generating -----------------------------------------------------------------------------

def flush(texts):
    """Save the text so far of several answers ({message id: text}) in one transaction (on
    PostgreSQL one statement over arrays, on SQLite one executemany): a worker's flushes cost one
    commit per tick, however many answers it runs. The first flush of an answer marks it
    'streaming'; an answer already final is left alone."""
    items = sorted(texts.items())
    if db.engine.dialect.name == "postgresql":  # one statement, whatever the count (_FLUSH_ALL)
        execute_write(_FLUSH_ALL, {"b_ids": [message_id for message_id, _ in items],
                                   "b_texts": [text for _, text in items], "b_now": utcnow()})
        return
    db.session.execute(_FLUSH_ONE.values(heartbeat_at=utcnow()),
                       [{"message_id": message_id, "text": text} for message_id, text in items])
    db.session.commit()


_RUNNING = or_(*(MESSAGES.c.status == status for status in RUNNING_STATUSES))  # not in_(): no expanding list
_FLUSH_ONE = update(MESSAGES).where(MESSAGES.c.id == bindparam("message_id"), _RUNNING).values(
    content=bindparam("text"), status=STREAMING)


def _locked_in_id_order(ids):
    """A CTE that locks these messages' rows in id order first, for a statement that writes several:
    flush and finish_many lock rows in the same order, so the two cannot deadlock (a join over an
    array locks them in whatever order its plan reads them)."""
    return select(MESSAGES.c.id).where(MESSAGES.c.id == any_(ids)).order_by(MESSAGES.c.id).with_for_update().cte()


def _given(name, **arrays):
    """unnest(arrays...) AS name(columns...): one row per answer, from one array parameter per column."""
    return func.unnest(*arrays.values()).table_valued(*arrays).render_derived(name=name)


def _flush_all_statement():
    """PostgreSQL's flush: every answer's text in ONE statement over two arrays, not a statement per
    answer in an executemany (500 answers: ~6 ms of CPU against ~46 ms)."""
    ids = bindparam("b_ids", type_=ARRAY(Integer))
    given = _given("given", id=ids, text=bindparam("b_texts", type_=ARRAY(MESSAGES.c.content.type)))
    locked = _locked_in_id_order(ids)
    return update(MESSAGES).where(MESSAGES.c.id == given.c.id, MESSAGES.c.id.in_(select(locked.c.id)), _RUNNING).values(
        content=given.c.text, status=STREAMING, heartbeat_at=bindparam("b_now"))


_FLUSH_ALL = _flush_all_statement()


def beat(message_ids):
    """The generating worker is alive: one statement for all its answers.

    Rows another transaction holds are skipped, not waited for. Those are being flushed or saved
    (both write the heartbeat themselves) or flagged for Stop, and waiting could deadlock: an
    UPDATE ... IN locks rows in the table's physical order, a flush or a batch of final saves in id
    order (seen with 150 answers ending together: PostgreSQL killed the heartbeat)."""
    free = (select(MESSAGES.c.id).where(_among(MESSAGES.c.id, message_ids), MESSAGES.c.status.in_(ACTIVE_STATUSES))
            .with_for_update(skip_locked=True))
    db.session.execute(update(MESSAGES).where(MESSAGES.c.id.in_(free.scalar_subquery())).values(heartbeat_at=utcnow()))
    db.session.commit()


def _among(column, ids):
    """`column IN ids` for the watchdog's every-tick statements over all of a worker's answers. On
    PostgreSQL as `= ANY(one array)`: the same short SQL whatever the count, where an IN list is a
    parameter per id (SQL that grows with the answers: ~8 KiB at 500, expanded by SQLAlchemy and
    converted by psycopg anew on every tick)."""
    if db.engine.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=ARRAY(Integer)))
    return column.in_(ids)


def request_cancel(message_id):
    """Stop, from any worker: the generating worker sees the flag on its next watchdog tick."""
    db.session.execute(update(Message).where(Message.id == message_id).values(cancel_requested=True))
    db.session.commit()


def cancel_requested(message_ids):
    """Which of these answers someone asked to stop, or deleted (read without holding the connection)."""
    rows = db.session.execute(select(MESSAGES.c.id, MESSAGES.c.cancel_requested)
                              .where(_among(MESSAGES.c.id, message_ids))).all()
    db.session.rollback()
    existing = {message_id: flagged for message_id, flagged in rows}
    return [message_id for message_id in message_ids if existing.get(message_id, True)]


# ---- the end ----------------------------------------------------------------------------------------

def finish(message_id, conversation_id, status, text, code=None, error=None, usage=None):
    """The final write of one answer (finish_many's, alone), retried a few times so a database hiccup
    does not leave the answer 'streaming'. Returns 1 when the answer was saved, 0 when its row is gone
    (the conversation was deleted), None when every attempt failed."""
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            return int(message_id in finish_many([(message_id, conversation_id, status, text, code, error, usage)]))
        except Exception:
            log.exception("saving message %s failed (attempt %d)", message_id, attempt)
            time.sleep(0.5 * attempt)
    return None


def finish_many(items):
    """Several answers' final writes (each as `finish` takes them: message_id, conversation_id,
    status, text, code, error, usage) in ONE transaction: a burst of answers ending together costs
    one commit, not one each. Returns the ids of the answers saved (one missing: its row was gone,
    the conversation deleted meanwhile); raises (rolled back) on failure, for the caller to retry one
    by one. Every item's usage has the same keys (generation._usage).

    Rows are written in message id order, as `flush` writes them: two transactions that lock
    several of the same rows in different orders can deadlock (the watchdog's flush and a batch)."""
    now = utcnow()
    usage_keys = tuple(sorted(items[0][6] or {}))
    items = sorted(items, key=lambda item: item[0])
    messages = [{"b_id": message_id, "b_text": text, "b_status": status, "b_code": code, "b_error": error,
                 "b_now": now, **{"b_" + key: (usage or {}).get(key) for key in usage_keys}}
                for message_id, _, status, text, code, error, usage in items]
    releases = [{"b_conversation_id": conversation_id, "b_message_id": message_id, "b_now": now}
                for message_id, conversation_id, *_ in items]
    if len(items) == 1:  # an answer ending alone (the common case): plain statements, not executemany
        messages, releases = messages[0], releases[0]
        saved = _finish_alone({**messages, **releases}, usage_keys)
        if saved is not None:
            return saved
    elif db.engine.dialect.name == "postgresql":
        rows = execute_alone(_finish_all_statement(usage_keys), _arrays(items, usage_keys, now))
        if rows is not None:
            return {message_id for message_id, in rows}
    try:
        saved = db.session.execute(_finish_many_statement(usage_keys), messages).rowcount
        db.session.execute(_RELEASE_AT, releases)
        ids = [item[0] for item in items]
        existing = set(ids) if saved == len(ids) else set(
            db.session.scalars(select(MESSAGES.c.id).where(MESSAGES.c.id.in_(ids))))
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return existing


def _finish_alone(params, usage_keys):
    """PostgreSQL, one answer: its final write and its conversation's release as ONE statement (two
    data-modifying CTEs) on a connection in autocommit, so the statement is its own transaction, as
    all-or-nothing as the two UPDATEs between BEGIN and COMMIT, in one round trip instead of four."""
    rows = execute_alone(_finish_alone_statement(usage_keys), params)
    if rows is None:
        return None
    (saved,), = rows
    return {params["b_id"]} if saved else set()


@functools.cache
def _finish_alone_statement(usage_keys):
    saved = _finish_many_statement(usage_keys).returning(MESSAGES.c.id).cte("saved")
    freed = update(CONVERSATIONS).where(*_RELEASE_WHERE).values(active_message_id=None,
                                                                updated_at=bindparam("b_now")).cte("freed")
    return select(func.count()).select_from(saved).add_cte(freed)


def _arrays(items, usage_keys, now):
    """finish_many's items as _finish_all_statement's parameters: one array per column."""
    columns = list(zip(*items, strict=True))
    usages = [usage or {} for usage in columns[6]]
    return {"b_ids": list(columns[0]), "b_conversation_ids": list(columns[1]), "b_statuses": list(columns[2]),
            "b_texts": list(columns[3]), "b_codes": list(columns[4]), "b_errors": list(columns[5]), "b_now": now,
            **{"u_" + key: [usage.get(key) for usage in usages] for key in usage_keys}}


@functools.cache
def _finish_all_statement(usage_keys):
    """PostgreSQL, several answers ending together: their final writes and their conversations'
    releases in ONE statement over one array per column (_arrays), not two statements per answer
    in executemany; rows locked in id order first, as flush locks them. Returns the ids saved."""
    m = MESSAGES.c
    ids = bindparam("b_ids", type_=ARRAY(Integer))

    def array(name, column):
        return bindparam(name, type_=ARRAY(column.type))
    given = _given("given", id=ids, conversation_id=array("b_conversation_ids", m.conversation_id),
                   status=array("b_statuses", m.status), text=array("b_texts", m.content),
                   code=array("b_codes", m.error_code), error=array("b_errors", m.error),
                   **{key: array("u_" + key, m[key]) for key in usage_keys})
    locked = _locked_in_id_order(ids)
    saved = update(MESSAGES).where(m.id == given.c.id, m.id.in_(select(locked.c.id))).values(
        content=given.c.text, status=given.c.status, error_code=given.c.code, error=given.c.error,
        heartbeat_at=bindparam("b_now"), **{key: given.c[key] for key in usage_keys}).returning(m.id).cte("saved")
    freed = update(CONVERSATIONS).where(
        CONVERSATIONS.c.id == given.c.conversation_id, CONVERSATIONS.c.active_message_id == given.c.id).values(
        active_message_id=None, updated_at=bindparam("b_now")).cte("freed")
    return select(saved.c.id).add_cte(freed)


@functools.cache
def _finish_many_statement(usage_keys):
    """finish_many's UPDATE, built once per set of usage columns (building one costs as much as running it)."""
    return update(MESSAGES).where(MESSAGES.c.id == bindparam("b_id")).values(
        content=bindparam("b_text"), status=bindparam("b_status"), error_code=bindparam("b_code"),
        error=bindparam("b_error"), heartbeat_at=bindparam("b_now"),
        **{key: bindparam("b_" + key) for key in usage_keys})


def interrupted(message_id, conversation_id, text):
    """The worker is shutting down: save the answer as interrupted, with its text so far."""
    return finish(message_id, conversation_id, INTERRUPTED, text, "interrupted", INTERRUPTED_MESSAGE)


def _release(conversation_id, message_id):
    """Free the conversation of an answer that did not finish (the final write frees its own: finish_many)."""
    db.session.execute(_RELEASE, {"b_conversation_id": conversation_id, "b_message_id": message_id})


# ---- answers orphaned by a dead worker ---------------------------------------------------------------

def _stale_before():
    return utcnow() - timedelta(seconds=current_app.config["STALE_AFTER_SECONDS"])


def interrupt_if_orphaned(message, is_live):
    """An answer still active whose heartbeat stopped was orphaned by a crash or restart: save it as
    interrupted with its partial text, and free its conversation for a retry. True if it was."""
    if message.status not in ACTIVE_STATUSES or is_live(message.id):
        return False
    cutoff = _stale_before()
    if message.heartbeat_at is not None and message.heartbeat_at > cutoff:
        return False
    changed = db.session.execute(update(Message).where(
        Message.id == message.id, Message.status.in_(ACTIVE_STATUSES),
        or_(Message.heartbeat_at.is_(None), Message.heartbeat_at <= cutoff)).values(
        status=INTERRUPTED, error_code="interrupted", error=INTERRUPTED_MESSAGE)).rowcount
    _release(message.conversation_id, message.id)
    db.session.commit()
    if changed:
        db.session.refresh(message)
    return bool(changed)


def free_if_orphaned(conversation_id, is_live, active_message_id=None):
    """If the conversation's running answer belongs to a dead worker (or is gone), free it."""
    if active_message_id is None:
        active_message_id = db.session.scalar(select(Conversation.active_message_id)
                                              .where(Conversation.id == conversation_id))
    if not active_message_id:
        return False
    message = db.session.get(Message, active_message_id)
    if message is None:
        _release(conversation_id, active_message_id)
        db.session.commit()
        return True
    return interrupt_if_orphaned(message, is_live)


def sweep_orphans(is_live, batch=100):
    """Save every orphaned answer anywhere as interrupted, so the database tells the truth before
    anyone looks. Cheap: the partial index ix_messages_active holds only pending/streaming rows."""
    orphans = db.session.scalars(select(Message).where(
        Message.status.in_(ACTIVE_STATUSES), Message.heartbeat_at <= _stale_before()).limit(batch)).all()
    return sum(interrupt_if_orphaned(message, is_live) for message in orphans)


def start_orphan_sweeper(app, is_live, spawn):
    """Every ORPHAN_SWEEP_SECONDS (in each served process), sweep_orphans. Every worker sweeps; the
    guarded UPDATE makes doing it twice harmless. `spawn` runs the loop in the background."""
    every = app.config["ORPHAN_SWEEP_SECONDS"]
    if every <= 0:
        return None  # off: reads still find orphans (free_if_orphaned, interrupt_if_orphaned)

    def loop():
        with app.app_context():
            while True:
                time.sleep(every)
                try:
                    reaped = sweep_orphans(is_live)
                    if reaped:
                        log.warning("saved %d answer(s) orphaned by a dead worker as interrupted", reaped)
                except Exception:  # a database hiccup must not end the sweeper
                    log.exception("orphan sweep failed")
                    db.session.rollback()
                finally:
                    db.session.remove()
    return spawn(loop, name="orphan-sweeper")

