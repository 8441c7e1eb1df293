"""Safe retries: a request's `Idempotency-Key` (after Stripe and draft-ietf-httpapi-idempotency-key-
header), per person. The first request with a key opens its answer and records the key in the same
transaction; a retry with the key and the same request gets that answer (finished, or followed while
it is generated) and no second generation; the key with a different request is a 422.

The row is the first write of the turn's transaction (webapp/answers.open_answer runs `claim` in its
guard), so of two simultaneous requests with one key the primary key (user_id, key) lets exactly one
through: on PostgreSQL the second INSERT waits for the first transaction and then fails, on SQLite
the second writer waits for the write lock and then finds the row. The loser's transaction is rolled
back whole (its new conversation and prompt with it) and it re-attaches to the winner's answer.

The fingerprint is a SHA-256 of the parsed request that decides the answer (the operation, prompt or
messages, conversation, model, options) as canonical JSON: a retry that spells the same request
differently (key order, 0.5 vs 0.50) is the same request; `stream` is left out, so a client may ask
for the answer it lost as a stream or whole."""
import hashlib
import json
from datetime import timedelta

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import ServiceError
from ..extensions import db
from ..limits import IDEMPOTENCY_KEY_HOURS
from ..models import IdempotencyKey, utcnow

KEYS = IdempotencyKey.__table__
TTL = timedelta(hours=IDEMPOTENCY_KEY_HOURS)


class KeyTaken(Exception):
    """Another request with this key committed first (raised after rolling this transaction back)."""


def fingerprint(operation, **request):
    canonical = json.dumps({"operation": operation, **request}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def find(user_id, key, print_):
    """The id of the answer this key opened, None for a key not seen in the last TTL (or whose answer
    was deleted since); 422 when the key came with a different request."""
    row = db.session.execute(select(KEYS.c.fingerprint, KEYS.c.message_id, KEYS.c.created_at)
                             .where(KEYS.c.user_id == user_id, KEYS.c.key == key)).first()
    if row is None or row.created_at <= utcnow() - TTL or row.message_id is None:
        return None
    if row.fingerprint != print_:
        raise ServiceError(422, "idempotency_key_reused",
                           "this Idempotency-Key was already used for a different request; use a new key "
                           "for a new request", "Idempotency-Key")
    return row.message_id


def claim(user_id, key, print_):
    """In the turn's transaction, first of its writes: forget the person's expired keys (an index range
    scan, usually empty) and record this one. Raises KeyTaken if another request holds it."""
    now = utcnow()
    db.session.execute(delete(KEYS).where(KEYS.c.user_id == user_id, KEYS.c.created_at <= now - TTL))
    try:
        db.session.execute(insert(KEYS).values(user_id=user_id, key=key, fingerprint=print_, created_at=now))
    except IntegrityError:
        db.session.rollback()
        raise KeyTaken() from None


def bind(user_id, key, message_id):
    """Still in that transaction: the answer it opened."""
    db.session.execute(update(KEYS).where(KEYS.c.user_id == user_id, KEYS.c.key == key)
                       .values(message_id=message_id))
