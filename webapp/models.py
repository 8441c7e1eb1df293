"""The data: users, their conversations, and one row per message."""
from datetime import UTC, datetime

from flask_login import UserMixin
from sqlalchemy import BigInteger, Boolean, DateTime, Double, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, configure_mappers, mapped_column, relationship
from sqlalchemy.orm.instrumentation import manager_of_class

from .auth import hashing
from .extensions import db
from .limits import API_KEY_NAME_MAX, IDEMPOTENCY_KEY_MAX, MODEL_NAME_MAX, TITLE_MAX


def utcnow():
    return datetime.now(UTC)


class UTCDateTime(db.TypeDecorator):
    """Timezone-aware UTC datetimes on PostgreSQL and SQLite alike (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def detached(cls, **values):
    """A copy of a row written or read with Core, tracked by no session, made the way SQLAlchemy's
    own loading makes instances: no __init__ and no attribute events (1 µs, where `cls(**values)`
    takes 12, and a turn makes five). A column it was not given reads None, as on a new instance."""
    instance = manager_of_class(cls).new_instance()
    instance.__dict__.update(values)
    return instance


def stored_text(value):
    """A text as SafeString/SafeText store it (see _NoNul): for copies of rows written with Core."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class _NoNul:
    """PostgreSQL text cannot hold NUL (U+0000) and refuses the whole statement; SQLite stores it. A
    NUL in a prompt, a typed username or a model's output must not lose the row (or answer with a
    500), so it becomes U+FFFD, the replacement character, the same on both databases."""

    def process_bind_param(self, value, dialect):
        return stored_text(value)


class SafeString(_NoNul, db.TypeDecorator):
    impl = String
    cache_ok = True


class SafeText(_NoNul, db.TypeDecorator):
    impl = Text
    cache_ok = True


# Indexes that exist on PostgreSQL only (migration 0003: pg_trgm for the search), not in the models:
# autogenerate and the drift test leave them alone.
POSTGRES_ONLY_INDEXES = {"ix_messages_content_trgm", "ix_conversations_title_trgm"}


def include_object(obj, name, type_, reflected, compare_to):
    return not (type_ == "index" and name in POSTGRES_ONLY_INDEXES)


# Message lifecycle. "queued" = waiting for a free slot at the model (LLM_MAX_PARALLEL, see
# answers.admit); "pending" = admitted, no text yet; "interrupted" = the worker generating it died
# (its partial text is kept).
QUEUED, PENDING, STREAMING, COMPLETE, ERROR, CANCELLED, INTERRUPTED = (
    "queued", "pending", "streaming", "complete", "error", "cancelled", "interrupted")
RUNNING_STATUSES = (PENDING, STREAMING)  # holding one of the model's slots
ACTIVE_STATUSES = (QUEUED, PENDING, STREAMING)
ACTIVE_WHERE = "status IN ('queued', 'pending', 'streaming')"
FINAL_STATUSES = (COMPLETE, ERROR, CANCELLED, INTERRUPTED)


# Where a conversation was made: the app's own doors, or the OpenAI-compatible /v1.
SOURCE_WEB, SOURCE_API = "web", "api"


class User(UserMixin, db.Model):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Stored lower-cased, which makes the unique constraint case-insensitive on every database.
    username: Mapped[str] = mapped_column(SafeString(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Bumped on password change / sign-out-everywhere: old JWTs and sessions stop working.
    token_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # An admin's per-person overrides of USER_MAX_RUNNING / USER_MAX_PER_MINUTE (NULL: the
    # configured default; 0: no limit). `flask set-limits` sets them.
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)


    @staticmethod
    def normalize(username):
        return (username or "").strip().lower()

    # The browser session this object was loaded for or signed in with (see auth/sessions.py).
    session_token = None

    def set_password(self, password):
        # Hashing runs in the password pool; callers release their database connection first.
        self.password_hash = hashing.generate(password)

    def check_password(self, password):
        return hashing.check(self.password_hash, password or "")

    def get_id(self):
        # flask-login keeps this in the session cookie (and the remember cookie): the random token of
        # a row in user_sessions, never the user id, so signing out on the server ends the cookie.
        return f"s:{self.session_token}" if self.session_token else None


class Conversation(db.Model):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_user_updated", "user_id", "updated_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(SafeString(TITLE_MAX), default="New chat")
    model: Mapped[str] = mapped_column(SafeString(MODEL_NAME_MAX))
    system_prompt: Mapped[str] = mapped_column(SafeText, default="")
    # Kept up to date by the chat service so lists need no COUNT over long chats.
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    # The assistant message being generated right now, if any: one turn at a time per conversation.
    active_message_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Which door made it: "web" (pages and the app's own API) or "api" (the OpenAI-compatible /v1).
    source: Mapped[str] = mapped_column(String(8), default=SOURCE_WEB, server_default=SOURCE_WEB)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


    def to_dict(self):
        return {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "message_count": self.message_count,
            "generating": self.active_message_id is not None,
            "source": self.source,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


class Message(db.Model):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        # Only the few answers being generated: the orphan sweep reads this, never the whole table.
        Index("ix_messages_active", "status", "heartbeat_at",
              postgresql_where=text(ACTIVE_WHERE), sqlite_where=text(ACTIVE_WHERE)),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(SafeString(16))
    content: Mapped[str] = mapped_column(SafeText, default="")
    status: Mapped[str] = mapped_column(SafeString(16), default=COMPLETE)
    error_code: Mapped[str | None] = mapped_column(SafeString(64), nullable=True)
    error: Mapped[str | None] = mapped_column(SafeText, nullable=True)
    model: Mapped[str | None] = mapped_column(SafeString(MODEL_NAME_MAX), nullable=True)
    request_id: Mapped[str | None] = mapped_column(SafeString(128), nullable=True)
    done_reason: Mapped[str | None] = mapped_column(SafeString(32), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Nanoseconds, as Ollama reports them.
    total_duration: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    load_duration: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    prompt_eval_duration: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    eval_duration: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Set by Stop from any worker; the generating worker polls it.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Touched by the generating worker while it works; a stale heartbeat means the worker died.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def tokens_per_second(self):
        if self.completion_tokens and self.eval_duration:
            return round(self.completion_tokens / self.eval_duration * 1e9, 1)
        return None

    def to_dict(self):
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "error": {"code": self.error_code, "message": self.error} if self.error_code else None,
            "model": self.model,
            "request_id": self.request_id,
            "done_reason": self.done_reason,
            "usage": usage_dict(self),
            "created_at": self.created_at.isoformat(),
        }


def usage_dict(message):
    prompt, completion = message.prompt_tokens, message.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": (prompt or 0) + (completion or 0) if prompt is not None or completion is not None else None,
        "total_duration_ms": ms(message.total_duration),
        "load_duration_ms": ms(message.load_duration),
        "prompt_eval_duration_ms": ms(message.prompt_eval_duration),
        "eval_duration_ms": ms(message.eval_duration),
        "tokens_per_second": message.tokens_per_second,
    }


def ms(nanoseconds):
    """Ollama's nanoseconds as milliseconds (one decimal), None when not reported."""
    return round(nanoseconds / 1e6, 1) if nanoseconds is not None else None


class RateLimitHit(db.Model):
    """One counted event (a failed sign-in) for the sign-in limits. Kept in the app's own database so
    every worker and replica counts together with no extra service; rows expire with their window."""
    __tablename__ = "rate_limit_hits"
    __table_args__ = (Index("ix_rate_limit_hits_key_at", "key", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # SHA-256 of the limiter's key, which holds a client address and a typed username.
    key: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Double)  # Unix time, as the `limits` library counts
    expires_at: Mapped[float] = mapped_column(Double, index=True)


class UserSession(db.Model):
    """One signed-in browser. The cookie holds a random token; this row holds its SHA-256, so the
    server can end a session (sign-out, sign-out everywhere, password change) and list them."""
    __tablename__ = "user_sessions"
    __table_args__ = (Index("ix_user_sessions_user_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    remember: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Never valid after this (issue time + REMEMBER_DAYS), remembered or not.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ip: Mapped[str | None] = mapped_column(SafeString(64), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(SafeString(256), nullable=True)

    user = relationship("User")


class SetupClaim(db.Model):
    """One-time setup steps, claimed by inserting their row: the primary key makes the claim atomic,
    so of any number of simultaneous sign-ups with the setup token exactly one becomes admin."""
    __tablename__ = "setup_claims"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(db.Model):
    """A personal API key: `llmk_<random>`, shown once. The row keeps its SHA-256 (never the key) and
    the first characters (`prefix`) so the owner can tell keys apart. Used as a bearer credential on
    the API (never as a browser session); refused once revoked, expired or its owner disabled."""
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_user_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(SafeString(API_KEY_NAME_MAX))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # at most once a minute
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # An admin's per-key answer limits (`flask set-limits NAME --key PREFIX`): when set, they apply to
    # calls made with this key instead of the person's own (None: the person's).
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)

    def to_dict(self):
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class IdempotencyKey(db.Model):
    """A request's `Idempotency-Key`, per person, and the answer it opened: a retry with the same key
    (and the same request, `fingerprint`: a SHA-256 of it) returns or re-attaches to that answer
    instead of starting another. Inserted in the transaction that opens the answer, first of its
    writes, so of two simultaneous requests with one key the primary key lets exactly one through.
    `message_id` is NULL only inside that transaction; deleting the answer (or its conversation)
    deletes the key with it, and regenerating it moves the key to the answer that takes its place.
    Keys count for IDEMPOTENCY_KEY_HOURS (24); older rows are ignored and removed by the person's
    next keyed request (webapp/service/idempotency.py)."""
    __tablename__ = "idempotency_keys"
    __table_args__ = (
        Index("ix_idempotency_keys_user_id_created_at", "user_id", "created_at"),
        Index("ix_idempotency_keys_message_id", "message_id"),  # the cascade from messages finds its row
    )

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_MAX), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RevokedToken(db.Model):
    """A bearer token (JWT) revoked on its own through RFC 7009 (POST /auth/revoke), by its `jti`,
    kept until the token would have expired anyway; then the row is useless and is purged. Checked in
    the same query that loads the token's user (auth/tokens.verify), so no extra round trip."""
    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


# Every mapped class is above: set their attributes up now, not at the first ORM query, so that
# detached() copies are readable in a request that runs nothing but Core (a bearer token's check).
configure_mappers()
