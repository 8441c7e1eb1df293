"""Configuration: every setting comes from the environment (a `.env` file is read when present).

`.env.example` lists each variable with its default; keep the two in step.
"""
import os
from datetime import timedelta
from pathlib import Path

from dotenv import load_dotenv

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_DIR = ROOT / "instance"

# Values people copy from examples: refusing them is the point of the check.
WEAK_SECRETS = {"", "dev", "secret", "changeme", "change-me", "please-change-me", "your-secret-key"}
MIN_SECRET_LENGTH = 32


def _bool(name, default):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _int(name, default):
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _float(name, default):
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def ollama_base_url(url=None, legacy=None):
    """OLLAMA_URL is a base URL; the seed's OLLAMA_API_URL pointed at /api/generate. Accept both."""
    if url:
        return url.rstrip("/")
    if legacy:
        legacy = legacy.rstrip("/")
        for suffix in ("/api/generate", "/api/chat", "/api"):
            if legacy.endswith(suffix):
                return legacy[: -len(suffix)]
        return legacy
    return "http://localhost:11434"


def _database_url():
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        return f"sqlite:///{INSTANCE_DIR / 'llm_api_assistant.db'}"
    # psycopg 3 is the driver; accept the common shorthands operators paste.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def load_config():
    """Read the environment into a plain dict of Flask config keys."""
    load_dotenv(ROOT / ".env", override=False)
    config = {
        "SECRET_KEY": os.environ.get("SECRET_KEY", ""),
        "DEBUG": _bool("FLASK_DEBUG", False),
        "SQLALCHEMY_DATABASE_URI": _database_url(),
        "LLM_BACKEND": os.environ.get("LLM_BACKEND", "ollama").strip().lower(),
        "OLLAMA_URL": ollama_base_url(os.environ.get("OLLAMA_URL"), os.environ.get("OLLAMA_API_URL")),
        "OPENAI_BASE_URL": os.environ.get("OPENAI_BASE_URL", "http://localhost:8080/v1").rstrip("/"),
        "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", ""),
        "DEFAULT_MODEL": os.environ.get("DEFAULT_MODEL", "llama3.2"),
        "LLM_CONNECT_TIMEOUT": _float("LLM_CONNECT_TIMEOUT", 5.0),
        "LLM_READ_TIMEOUT": _float("LLM_READ_TIMEOUT", 120.0),
        "OLLAMA_LOAD_TIMEOUT": _float("OLLAMA_LOAD_TIMEOUT", 300.0),
        "OLLAMA_KEEP_ALIVE": os.environ.get("OLLAMA_KEEP_ALIVE", "").strip() or None,
        "LLM_TEMPERATURE": _float("LLM_TEMPERATURE", -1.0),
        "LLM_NUM_CTX": _int("LLM_NUM_CTX", 0),
        "LLM_NUM_PREDICT": _int("LLM_NUM_PREDICT", 0),
        # The fair queue in front of the model: at most this many answers per model at once (like
        # Ollama's OLLAMA_NUM_PARALLEL), the rest wait their turn, round-robin across people, for at
        # most LLM_QUEUE_TIMEOUT seconds. 0: no queue.
        "LLM_MAX_PARALLEL": max(0, _int("LLM_MAX_PARALLEL", 4)),
        "LLM_QUEUE_TIMEOUT": _float("LLM_QUEUE_TIMEOUT", 120.0),
        # Per person: unfinished answers at once (queued ones count) and answers started per minute;
        # 0 turns a limit off. `flask set-limits` overrides both for one person.
        "USER_MAX_RUNNING": max(0, _int("USER_MAX_RUNNING", 2)),
        "USER_MAX_PER_MINUTE": max(0, _int("USER_MAX_PER_MINUTE", 30)),
        # Ceilings on what a client may ask of the model (larger values are refused with 422).
        "LLM_MAX_NUM_CTX": _int("LLM_MAX_NUM_CTX", 8192),
        "LLM_MAX_NUM_PREDICT": _int("LLM_MAX_NUM_PREDICT", 2048),
        # Models a client may name besides those the model server lists (comma-separated); while the
        # model server is unreachable only these and DEFAULT_MODEL are accepted.
        "ALLOWED_MODELS": [name.strip() for name in os.environ.get("ALLOWED_MODELS", "").split(",") if name.strip()],
        "TOKEN_EXPIRES_MINUTES": _int("TOKEN_EXPIRES_MINUTES", 60),
        "MAX_PROMPT_CHARS": _int("MAX_PROMPT_CHARS", 32_000),
        "CONTEXT_MAX_MESSAGES": _int("CONTEXT_MAX_MESSAGES", 40),
        "CONTEXT_MAX_CHARS": _int("CONTEXT_MAX_CHARS", 24_000),
        "MODELS_CACHE_SECONDS": _float("MODELS_CACHE_SECONDS", 30.0),
        "STREAM_FLUSH_SECONDS": _float("STREAM_FLUSH_SECONDS", 0.25),
        "HEARTBEAT_SECONDS": _float("HEARTBEAT_SECONDS", 1.0),
        "STALE_AFTER_SECONDS": _float("STALE_AFTER_SECONDS", 15.0),
        "ORPHAN_SWEEP_SECONDS": _float("ORPHAN_SWEEP_SECONDS", 10.0),
        "ALLOW_SIGNUP": _bool("ALLOW_SIGNUP", True),
        "MIN_PASSWORD_LENGTH": _int("MIN_PASSWORD_LENGTH", 8),
        # Sign-ins waiting for the password-hash pool per process before 503 (0: automatic).
        "PASSWORD_HASH_QUEUE": _int("PASSWORD_HASH_QUEUE", 0),
        "PASSWORD_HASH_WAIT": _float("PASSWORD_HASH_WAIT", 10.0),
        # Browser sessions (and the remember-me cookie) end this many days after sign-in; at most 30.
        "REMEMBER_DAYS": min(30, max(1, _int("REMEMBER_DAYS", 14))),
        # Failed sign-ins allowed before 429 (both doors together); empty turns a limit off.
        "LOGIN_LIMIT_PER_USER": os.environ.get("LOGIN_LIMIT_PER_USER", "10 per minute;50 per hour").strip(),
        "LOGIN_LIMIT_PER_ADDRESS": os.environ.get("LOGIN_LIMIT_PER_ADDRESS", "100 per hour").strip(),
        "SIGNUP_LIMIT_PER_ADDRESS": os.environ.get("SIGNUP_LIMIT_PER_ADDRESS", "5 per hour").strip(),
        "REVOKE_LIMIT_PER_ADDRESS": os.environ.get("REVOKE_LIMIT_PER_ADDRESS", "60 per minute").strip(),
        "RATELIMIT_STORAGE_URI": os.environ.get("RATELIMIT_STORAGE_URI", "").strip() or "database://",
        # database://'s own connections per process (apart from the request pool), and the longest a
        # sign-in waits for one before 503 with Retry-After.
        "LIMIT_STORE_CONNECTIONS": _int("LIMIT_STORE_CONNECTIONS", 2),
        "LIMIT_STORE_TIMEOUT": _float("LIMIT_STORE_TIMEOUT", 5.0),
        "TRUSTED_PROXIES": _int("TRUSTED_PROXIES", 0),
        # ...believed only from peers in these networks (comma-separated CIDRs; empty: nobody).
        "TRUSTED_PROXY_NETWORKS": os.environ.get("TRUSTED_PROXY_NETWORKS", "").strip(),
        # Origins whose pages may call the API from a browser (comma- or space-separated, e.g.
        # https://app.example.com; * for any); empty: no CORS headers at all (webapp/cors.py).
        "CORS_ORIGINS": os.environ.get("CORS_ORIGINS", "").strip(),
        # Strict-Transport-Security max-age on HTTPS responses (0: no HSTS header).
        "HSTS_SECONDS": _int("HSTS_SECONDS", 365 * 24 * 3600),
        # If the limit store fails (a database hiccup, a missed migration), sign-in goes on unthrottled
        # and a warning is logged (auth/throttle.py): locking everyone out would be worse than a gap.
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO").upper(),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": _bool("SESSION_COOKIE_SECURE", False),
        "REMEMBER_COOKIE_SECURE": _bool("SESSION_COOKIE_SECURE", False),
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SAMESITE": "Lax",
        "REMEMBER_COOKIE_NAME": "remember_token",
        "WTF_CSRF_TIME_LIMIT": None,
        # No pool_pre_ping (a round trip per checkout): webapp/db_ping.py checks idle connections only.
        "SQLALCHEMY_ENGINE_OPTIONS": {},
        # The database connection budget of each worker process (see webapp/capacity.py): requests
        # wait for a connection in a per-worker queue of at most DB_QUEUE_MAX, holding nothing, for at
        # most DB_POOL_TIMEOUT seconds; past either they are answered 503 + Retry-After.
        "DB_POOL_SIZE": _int("DB_POOL_SIZE", 10),
        "DB_MAX_OVERFLOW": _int("DB_MAX_OVERFLOW", 0),
        "DB_POOL_TIMEOUT": _float("DB_POOL_TIMEOUT", 30.0),
        "DB_QUEUE_MAX": max(0, _int("DB_QUEUE_MAX", 1000)),
    }
    config["REMEMBER_COOKIE_DURATION"] = timedelta(days=config["REMEMBER_DAYS"])
    # Refuse huge bodies before parsing them: room for the longest prompt in 4-byte UTF-8, plus JSON.
    config["MAX_CONTENT_LENGTH"] = config["MAX_PROMPT_CHARS"] * 4 + 64 * 1024
    return config


def secret_key_problem(config):
    """Return why the secret key is unfit for production, or None."""
    key = config.get("SECRET_KEY") or ""
    if key.strip().lower() in WEAK_SECRETS:
        return "SECRET_KEY is not set"
    if len(key) < MIN_SECRET_LENGTH:
        return f"SECRET_KEY is shorter than {MIN_SECRET_LENGTH} characters"
    return None
