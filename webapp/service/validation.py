"""What the service accepts: each check raises a ServiceError naming the field; limits come from
webapp/limits.py (fixed) or the configuration (operator's)."""
from flask import current_app

from ..errors import invalid
from ..limits import MAX_ID, MODEL_NAME_MAX, SYSTEM_PROMPT_MAX, TITLE_FROM_PROMPT, TITLE_MAX


def clean_prompt(prompt):
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string")
    if not prompt.strip():
        raise invalid("prompt", "prompt must not be empty")
    limit = current_app.config["MAX_PROMPT_CHARS"]
    if len(prompt) > limit:
        raise invalid("prompt", f"prompt is longer than {limit} characters")
    return prompt


def clean_text(value, name, limit, allow_empty=True):
    if not isinstance(value, str):
        raise invalid(name, f"{name} must be a string")
    value = value.strip()
    if not value and not allow_empty:
        raise invalid(name, f"{name} must not be empty")
    if len(value) > limit:
        raise invalid(name, f"{name} is longer than {limit} characters")
    return value


def clean_title(value):
    return clean_text(value, "title", TITLE_MAX, allow_empty=False)


def clean_model(value):
    return clean_text(value, "model", MODEL_NAME_MAX, allow_empty=False)


def clean_system_prompt(value):
    return clean_text(value, "system_prompt", SYSTEM_PROMPT_MAX)


def title_from(prompt):
    """A title from the first prompt, at once: its first line, cut at a word boundary."""
    line = " ".join(prompt.split())
    if len(line) <= TITLE_FROM_PROMPT:
        return line
    cut = line[:TITLE_FROM_PROMPT].rsplit(" ", 1)[0] or line[:TITLE_FROM_PROMPT]
    return cut + "…"


def as_id(value):
    """A row id from a client, or None when it cannot be one (ids are positive 32-bit integers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 < value <= MAX_ID else None
