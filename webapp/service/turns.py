"""A turn: save the prompt, claim the conversation and create the answer in one transaction, hand
generation to the background (webapp/generation.py), and let callers follow it. No database
connection is held while waiting on the LLM; every read and write here is a short transaction."""
import threading
import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import and_, bindparam, or_, select

from .. import answers, push
from ..auth import tokens
from ..errors import ServiceError
from ..extensions import db, execute_read, llm_service
from ..generation import Job, generations
from ..limits import SYSTEM_PROMPT_MAX
from ..models import COMPLETE, FINAL_STATUSES, QUEUED, SOURCE_API, SOURCE_WEB, Conversation, Message
from . import idempotency, token_check
from .conversations import conversation_values, create_conversation, free_if_orphaned, get_conversation, request_stop
from .fairness import guard_for, take_turn
from .validation import as_id, check_model, check_options, clean_prompt, title_from

COALESCE_SECONDS = 0.03  # a follower gathers the tokens of this long into one event (DESIGN: 25-50 ms)


@dataclass
class Turn:
    """What a started turn is. The rows are detached copies as they were committed: safe to render
    after the request's session has moved on (another request may delete the originals)."""
    conversation: Conversation
    user_message: Message | None
    answer: Message
    job: Job | None = None  # the generation still to run, for a turn started with run_here (answer_here)
    replayed: bool = False  # a retry (same Idempotency-Key): the first request's answer, not a new one

    @property
    def conversation_id(self):
        return self.conversation.id

    @property
    def message_id(self):
        return self.answer.id

    @property
    def user_message_id(self):
        return self.user_message.id if self.user_message else None

    @property
    def model(self):
        return self.answer.model

    @property
    def prompt(self):
        return self.user_message.content if self.user_message else None


def start_turn(user, prompt, conversation_id=None, model=None, request_id=None, options=None,
               keep_model=False, idempotency_key=None, run_here=False):
    """Save the prompt, claim the conversation, start generating; returns the Turn at once.
    `user`: the User, or a bearer token whose row is still to check (auth.tokens.Unchecked): the
    check rides on the statement that starts the turn where it can (token_check), else runs first.
    `keep_model`: the model becomes the conversation's own (the page's picker), not just this answer's.
    `idempotency_key`: a retry with the same key and request gets the first one's Turn (`replayed`).
    `run_here`: do not start the generation; the caller runs it with answer_here(turn)."""
    prompt = clean_prompt(prompt)
    model = check_model(model) if model is not None else None
    options = check_options(options)
    user, fold = _with_fold(user, idempotency_key is None)

    def start(claim):
        nonlocal user
        opened = None
        if claim is None:
            user, opened = _alone(user, fold, lambda guard: _start_alone(
                user, guard, conversation_id, prompt, model, keep_model, request_id))
        if opened is not None:
            return _launch(*opened, options, [] if conversation_id is None else None, run_here=run_here)
        if conversation_id is None:
            conversation = create_conversation(user, title=title_from(prompt), model=model, commit=False)
            history = []  # a new conversation has nothing before this prompt
        else:
            conversation = get_conversation(user, conversation_id)
            if keep_model and model:
                conversation.model = model
            history = None
        prompt_message, answer = answers.open_answer(conversation, model or conversation.model, request_id,
                                                     prompt=prompt, is_live=generations.is_live,
                                                     queued=_queue_on(), guard=_guard(user, claim))
        return _launch(conversation, prompt_message, answer, options, history, claim=claim, run_here=run_here)

    return _once(user, idempotency_key, start, "chat", prompt=prompt, conversation_id=conversation_id,
                 model=model, options=options)


def _with_fold(user, may_fold):
    """(user, fold): a bearer token whose row can ride on the one-statement start (`may_fold`: no key
    to claim first) stays unchecked, with how the start checks it (token_check); any other is
    checked now."""
    if not isinstance(user, tokens.Unchecked):
        return user, None
    fold = token_check.fold_for(user) if may_fold else None
    return (user, fold) if fold is not None else (user.check_now(), None)


def _alone(user, fold, open_with):
    """(user, opened): `open_with(guard)`, a one-statement start, with the token's row folded in
    (`fold`), and where that wrote nothing (or there is no fold), with the person's own guard (the
    per-person limits; None when off), once the row is known: as the statement read it, or now."""
    if fold is not None:
        opened = open_with(fold)
        user = user.user or user.check_now()
        if opened is not None:
            return user, opened
    return user, open_with(guard_for(user))


def _start_alone(user, guard, conversation_id, prompt, model, keep_model, request_id):
    """start_turn's one-statement start (no key): the token's row checked in it (`guard` a
    token_check fold) or the per-person limits decided in it (a fairness Guard, when they are on)."""
    if conversation_id is None:
        return _open_alone(user, prompt, model, request_id, guard)
    return _continue_alone(user, conversation_id, prompt, model, keep_model, request_id, guard)


def _open_alone(user, prompt, model, request_id, guard, system_prompt="", source=SOURCE_WEB, earlier=()):
    """A new conversation with its prompt and answer in one statement (answers.open_in_new_conversation),
    after the `earlier` messages [(role, content)] when there are any, the per-person limits (or the
    token's row) decided inside it by `guard` (the caller checked there is no key): the
    (conversation, prompt, answer) it wrote, or None for the general path."""
    values = conversation_values(user, title_from(prompt), model, system_prompt, source)
    return answers.open_in_new_conversation(values, values["model"], request_id, prompt, queued=_queue_on(),
                                            guard=guard, earlier=earlier)


def _continue_alone(user, conversation_id, prompt, model, keep_model, request_id, guard):
    """The claim first, with the prompt and the answer, in one statement (answers.continue_conversation),
    the per-person limits (or the token's row) decided inside it by `guard`: the (conversation,
    prompt, answer) it wrote, or None for the general path (which says why the claim was not made, or
    frees an orphan)."""
    conversation_id = as_id(conversation_id)
    if conversation_id is None:
        return None
    return answers.continue_conversation(user.id, conversation_id, prompt, model, keep_model, request_id,
                                         queued=_queue_on(), guard=guard)


def _guard(user, claim):
    """What open_answer runs first in each attempt's transaction: the Idempotency-Key's row (before
    the per-person limits and the conversation's claim, so two requests with one key meet there and
    nowhere else), then the per-person limits."""
    def guard():
        if claim is not None:
            idempotency.claim(*claim)
        take_turn(user)
    return guard


def _once(user, key, start, operation, **request):
    """`start(claim)` unless this key already opened an answer for this request: then that answer's
    Turn, marked replayed. A request that loses the race for its key to a simultaneous one (KeyTaken:
    its own transaction is rolled back whole) re-attaches to the winner's answer."""
    if key is None:
        return start(None)
    claim = (user.id, key, idempotency.fingerprint(operation, **request))
    for _ in range(3):
        message_id = idempotency.find(*claim)
        turn = _replay(message_id) if message_id is not None else None
        if turn is not None:
            return turn
        try:
            return start(claim)
        except idempotency.KeyTaken:
            continue  # the winner committed: find its answer
    raise ServiceError(409, "idempotency_key_busy", "another request with this Idempotency-Key is being "
                                                    "handled; retry in a moment", "Idempotency-Key")


def _replay(message_id):
    """The Turn a key's first request started, read anew (detached, no connection kept); None if gone."""
    db.session.expire_all()
    answer = db.session.get(Message, message_id)
    turn = None
    if answer is not None:
        conversation = db.session.get(Conversation, answer.conversation_id)
        prompt = db.session.scalars(select(Message).where(
            Message.conversation_id == answer.conversation_id, Message.id < answer.id, Message.role == "user")
            .order_by(Message.id.desc()).limit(1)).first()
        rows = [row for row in (conversation, prompt, answer) if row is not None]
        for row in rows:
            db.session.expunge(row)
        turn = Turn(conversation, prompt, answer, replayed=True)
    db.session.rollback()  # ends the read: the connection goes back to the pool
    return turn


def _queue_on():
    return current_app.config["LLM_MAX_PARALLEL"] > 0


def regenerate(user, conversation_id, model=None, request_id=None, options=None, run_here=False):
    """Run the last turn again. The last answer (failed, stopped or fine) is replaced by the new one."""
    conversation = get_conversation(user, conversation_id)
    model = check_model(model) if model else conversation.model
    options = check_options(options)
    last = db.session.execute(select(Message.id, Message.role).where(Message.conversation_id == conversation.id)
                              .order_by(Message.id.desc()).limit(1)).first()
    if last is None:
        raise ServiceError(409, "nothing_to_regenerate", "this conversation has no message to answer again")
    replaces = last.id if last.role == "assistant" else None
    _, answer = answers.open_answer(conversation, model, request_id, replaces=replaces,
                                    is_live=generations.is_live, queued=_queue_on(),
                                    guard=lambda: take_turn(user))
    return _launch(conversation, None, answer, options, None, run_here=run_here)


def start_exchange(user, messages, conversation_id=None, model=None, request_id=None, options=None,
                   idempotency_key=None):
    """A turn whose context is given whole by the caller (the OpenAI-compatible /v1): the model
    receives exactly `messages` ([{"role", "content"}], checked by the door; the last one is the
    user's). The exchange is saved in a conversation marked as made through the API: a new one, or
    `conversation_id`'s when its stored path (system prompt, then its messages, failed answers left
    out) is the start of `messages` — then only the messages past it are stored. When the stored path
    does not match (the client edited its history), a new conversation is made: nothing is lost and
    nothing is overwritten. Returns the Turn at once, as start_turn does (and replays as it does for
    an `idempotency_key` seen before). `user`: the User, or a bearer token whose row is still to
    check, as start_turn takes it (here the check rides on a new conversation's start only)."""
    model = check_model(model)
    options = check_options(options)
    prompt = clean_prompt(messages[-1]["content"])
    user, fold = _with_fold(user, idempotency_key is None and conversation_id is None)  # a new one's start only

    def start(claim):
        nonlocal user
        conversation, stored = None, 0
        if conversation_id is not None:
            conversation = get_conversation(user, conversation_id)
            stored = _stored_prefix(conversation, messages)
            if stored is None:
                conversation, stored = None, 0
        if conversation is None:
            system = messages[0]["content"] if messages[0]["role"] == "system" and len(messages) > 1 else ""
            if len(system) > SYSTEM_PROMPT_MAX:
                system = ""  # too long for the conversation's system prompt: stored as a message instead
            stored = 1 if system else 0
        # The messages past the stored ones go in with the prompt, in each of open_answer's attempts:
        # added here, a retry after freeing an orphaned answer (its rollback) would lose them.
        earlier = [(m["role"], m["content"]) for m in messages[stored:-1]]
        if conversation is None:
            if claim is None:  # nothing to run first: the whole exchange in one statement
                user, opened = _alone(user, fold, lambda guard: _open_alone(
                    user, prompt, model, request_id, guard, system, SOURCE_API, earlier))
                if opened is not None:
                    return _launch(*opened, options, None, context=list(messages))
            conversation = create_conversation(user, title=title_from(prompt), model=model, system_prompt=system,
                                               commit=False, source=SOURCE_API)
        prompt_message, answer = answers.open_answer(conversation, model, request_id, prompt=prompt,
                                                     is_live=generations.is_live, queued=_queue_on(),
                                                     guard=_guard(user, claim), earlier=earlier)
        return _launch(conversation, prompt_message, answer, options, None, context=list(messages), claim=claim)

    return _once(user, idempotency_key, start, "chat.completions", messages=messages,
                 conversation_id=conversation_id, model=model, options=options)


def _stored_prefix(conversation, messages):
    """How many of `messages` the conversation already holds, in order (its system prompt counts as
    the first when it has one), or None when its path is not the start of `messages`. Reads at most
    len(messages) rows: the cost follows the request, not the conversation's length."""
    path = [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []
    rows = db.session.execute(
        select(Message.role, Message.content).where(
            Message.conversation_id == conversation.id,
            or_(Message.role != "assistant", Message.status == COMPLETE))
        .order_by(Message.id).limit(len(messages))).all()
    path += [{"role": role, "content": content} for role, content in rows]
    if len(path) >= len(messages) or path != [{"role": m["role"], "content": m["content"]}
                                              for m in messages[:len(path)]]:
        return None
    return len(path)


def _launch(conversation, prompt_message, answer, options, history, context=None, claim=None, run_here=False):
    if claim is not None:
        idempotency.bind(claim[0], claim[1], answer.id)
    messages = context if context is not None else build_context(conversation, answer.id, history, prompt_message)
    job = Job(message_id=answer.id, conversation_id=conversation.id, model=answer.model, messages=messages,
              options=options or {}, request_id=answer.request_id, queued=answer.status == QUEUED)
    if conversation in db.session:  # a conversation read from the database; the rest are copies already
        db.session.expunge(conversation)  # keeps what was written, readable after the commit
    db.session.commit()  # the prompt is safe before the LLM is called, and no connection is held after
    if run_here:
        return Turn(conversation, prompt_message, answer, job)
    generations.launch(job, llm_service.client)
    return Turn(conversation, prompt_message, answer)


def answer_here(turn):
    """Generate a turn started with `run_here` in the calling request, and return its answer as
    saved (the Turn's own copy, updated), or None when its conversation was deleted meanwhile.

    For a caller that waits for the whole answer anyway (the non-streaming API), this is the same
    generation as a background one, registered the same way (Stop, followers, heartbeats, orphan
    handling and shutdown see it) and saved by the same final write, but without a task to start,
    a hand-off at its end and a re-read of the row. The answer still belongs to the server: a
    client that hangs up does not stop the request's work (gunicorn finishes it), and the answer is
    saved whole. A replayed turn (Idempotency-Key) has no generation to run: its first request runs
    it, and this waits for its end as wait_final does."""
    if turn.job is None:
        return wait_final(turn.message_id)
    generation = generations.run_here(turn.job, llm_service.client)
    if generation.saved is None:  # the final save failed: report what the database holds
        return _fresh_message(turn.message_id)
    if not generation.saved:
        return None
    return generation.live.final  # the row as the final write stored it (made by Generation._save)


# build_context's read, built once (the statement is kept compiled: webapp/direct_sql.py).
_CONTEXT = select(Message.role, Message.content).where(
    Message.conversation_id == bindparam("b_conversation_id"), Message.id < bindparam("b_answer_id"),
    or_(Message.role == "user", and_(Message.role == "assistant", Message.status == COMPLETE))
).order_by(Message.id.desc()).limit(bindparam("b_limit"))


def build_context(conversation, answer_id, history=None, prompt_message=None):
    """System prompt + newest messages within the budget. Costs the same for 10 or 10,000 messages:
    one index range scan backwards from the answer, LIMIT-ed. Failed and stopped answers are left out.
    `history` given (a new conversation) skips the query."""
    config = current_app.config
    if history is None:  # read alone where it can be: a turn that started in one statement opens no transaction
        rows = execute_read(_CONTEXT, {"b_conversation_id": conversation.id, "b_answer_id": answer_id,
                                       "b_limit": config["CONTEXT_MAX_MESSAGES"]})
    else:
        rows = [(m.role, m.content) for m in reversed(history + [prompt_message] if prompt_message else history)]
    budget = config["CONTEXT_MAX_CHARS"] - len(conversation.system_prompt or "")
    kept = []
    for role, content in rows:
        if kept and len(content) > budget:
            break
        kept.append({"role": role, "content": content})
        budget -= len(content)
    kept.reverse()
    if conversation.system_prompt:
        kept.insert(0, {"role": "system", "content": conversation.system_prompt})
    return kept


# ---- following and stopping -----------------------------------------------------------------------

def follow(message_id, since=0, poll=0.3, keepalive=10.0):
    """Yield ("token", text) as the answer grows past `since` characters, then ("done", Message)
    once it is final. `since` is where the caller already is (an SSE `Last-Event-ID`: the answer's
    character offset), so a resumed stream neither repeats nor loses a character; 0 replays it all.
    While the answer waits in the model's queue, ("queued", place) each time its place in line
    changes (1 = next to run; read from the row when it is generated on another worker).

    Tokens come from this process's live generation when it is here. Elsewhere they are pushed
    (PostgreSQL LISTEN/NOTIFY, webapp/push.py: the generating worker publishes deltas, batched per
    worker, only for answers someone on another worker follows), with the row the generating
    worker flushes as the durable copy and the gap-filler; with SQLite, or when push is off, the
    row is polled every `poll` seconds. ("idle", None) comes after each quiet `poll` (a tick for
    throttled renderers), and ("ping", None) every `keepalive` seconds of silence, to let the
    caller notice a client that went away.
    """
    subscription = None if generations.get(message_id) is not None else push.subscribe(message_id)
    try:
        yield from _follow(message_id, since, poll, keepalive, subscription)
    finally:
        if subscription is not None:
            subscription.close()


def _follow(message_id, sent, poll, keepalive, subscription):
    idle_since, read_row, announced, last_read = time.monotonic(), True, False, 0.0
    last_news, place, live, first = last_read, None, None, True
    news = threading.Event()  # this follower's wake-up from a live generation here (Live.wait)
    while True:
        # A generation saved here ends from memory (Live.final: the row as committed), so a burst of
        # streams ending together costs no read each; one whose save failed is read from the row.
        live = generations.get(message_id) or (live if live is not None and live.final is not None else None)
        text, finished, offset = None, False, 0
        if live is not None:
            if live.position is not None and live.position != place:
                place = live.position
                yield "queued", place
            live.wait(sent, poll, news)
            final = live.final
            if final is not None:
                if len(final.content) > sent:
                    yield "token", final.content[sent:]
                yield "done", final
                return
            if not first and not live.gathered and not live.done and len(live.text) > sent:
                live.wait_done(COALESCE_SECONDS)  # a few tokens per event, not a wake-up per token; none at the end
            text = live.text  # the final state is read from the row below
        elif subscription is not None and not read_row:
            pushed = subscription.take(sent, timeout=poll)
            now = time.monotonic()
            if pushed.text:
                text, offset, last_news = pushed.text, sent, now
            # Read the row at the end, after a gap (a missed or text-less notification; at most every
            # `poll` seconds while the row lags behind the pushed offsets), or after a long silence
            # (which is also how a dead generating worker is noticed).
            read_row = (pushed.end or (pushed.gap and now - last_read >= poll)
                        or now - max(last_read, last_news) >= push.SAFETY_SECONDS)
        if live is None and (subscription is None or read_row):
            message = _fresh_message(message_id)
            last_read, read_row = time.monotonic(), False
            if message is None:
                return
            if answers.interrupt_if_orphaned(message, generations.is_live):
                message = _fresh_message(message_id)
            if message.status == QUEUED:  # generated on another worker: read its place in line
                now = answers.place_in_line(message_id, message.model)
                if now is not None and now != place:
                    place = now
                    yield "queued", place
            text, finished, offset = message.content, message.status in FINAL_STATUSES, 0
            if subscription is not None and not finished and not announced:
                subscription.announce()  # the generating worker starts publishing from offset 0
                announced = True
        if text is not None and len(text) + offset > sent:
            yield "token", text[sent - offset:]
            sent, idle_since, first = len(text) + offset, time.monotonic(), False  # the first token at once
        elif not finished:
            yield "idle", None
        if finished:
            yield "done", _fresh_message(message_id)
            return
        if live is None and subscription is None:
            time.sleep(poll)
        if time.monotonic() - idle_since >= keepalive:
            idle_since = time.monotonic()
            yield "ping", None


def wait_final(message_id, timeout=None):
    """Block until the message is final (or the timeout): the non-streaming API's way to answer.
    Generated here: wait for its end without waking per token. Elsewhere: follow its row."""
    deadline = None if timeout is None else time.monotonic() + timeout
    final = wait_here(message_id, timeout)
    if final is not None:
        return _fresh_message(message_id) if final is False else final
    for kind, value in follow(message_id):
        if kind == "done":
            return value
        if deadline is not None and time.monotonic() > deadline:
            break
    return _fresh_message(message_id)


def wait_here(message_id, timeout):
    """An answer generated in this process: wait up to `timeout` for its end. Its final Message once
    it has ended (from memory where its save succeeded, also a few seconds after it ended), False
    while it runs: nothing is read. None when it is not generated here (or ended long ago): follow
    it with wait_final."""
    live = generations.get(message_id) or generations.ended(message_id)
    if live is None:
        return None
    if not live.wait_done(timeout):
        return False
    return live.final if live.final is not None else _fresh_message(message_id)


def _fresh_message(message_id):
    """Read the row anew and release the connection at once (followers may wait for minutes)."""
    db.session.expire_all()
    message = db.session.get(Message, message_id)
    if message is not None:
        db.session.expunge(message)
    db.session.rollback()  # ends the transaction: the connection goes back to the pool
    return message


def stop(user, conversation_id):
    """Ask the running answer to stop, from any worker; returns its id (follow it for the outcome)."""
    conversation = get_conversation(user, conversation_id)
    free_if_orphaned(conversation)
    message_id = conversation.active_message_id
    if not message_id:
        raise ServiceError(409, "not_generating", "nothing is being generated in this conversation")
    request_stop(message_id)
    return message_id


def cancel(message_id):
    """Stop an answer the caller itself started (the /v1 door, when its client goes away): saved as
    cancelled with its partial text, from any worker. No lookup: the id came from the caller's Turn."""
    request_stop(message_id)
