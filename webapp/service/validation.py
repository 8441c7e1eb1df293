"""What the service accepts: each check raises a ServiceError naming the field; limits come from
webapp/limits.py (fixed) or the configuration (operator's)."""
from flask import current_app

from ..answers import model_key
from ..errors import LLMError, ServiceError, invalid
from ..extensions import llm_service
from ..limits import MAX_ID, MODEL_NAME_MAX, OPTION_RULES, SYSTEM_PROMPT_MAX, TITLE_FROM_PROMPT, TITLE_MAX

# Operator ceilings on generation options: option -> the setting that caps its maximum.
OPTION_CEILINGS = {"num_ctx": "LLM_MAX_NUM_CTX", "num_predict": "LLM_MAX_NUM_PREDICT"}


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


def known_models():
    """The names a client may pick: the model server's list (cached, see llm_service) plus the
    operator's ALLOWED_MODELS; while the server is unreachable, ALLOWED_MODELS and DEFAULT_MODEL."""
    config = current_app.config
    try:
        offered = [model["name"] for model in llm_service.list_models() if model.get("name")]
    except LLMError:
        offered = [config["DEFAULT_MODEL"]]
    return offered + list(config["ALLOWED_MODELS"])


def check_model(value, field="model"):
    """A model name a client gave: well-formed and one this server offers, else 422 unknown_model."""
    name = clean_text(value, field, MODEL_NAME_MAX, allow_empty=False)
    if model_key(name) not in {model_key(known) for known in known_models()}:  # 'x' is 'x:latest'
        raise ServiceError(422, "unknown_model", f"{field} '{name[:80]}' is not a model this server offers "
                                                 "(GET /models lists them)", field)
    return name


def option_rules():
    """OPTION_RULES with the operator's ceilings (LLM_MAX_NUM_CTX, LLM_MAX_NUM_PREDICT) as maxima:
    what clients may send, as the API checks it and its OpenAPI document prints it."""
    config = current_app.config
    rules = dict(OPTION_RULES)
    for name, setting in OPTION_CEILINGS.items():
        kind, low, high = rules[name]
        if config.get(setting, 0) > 0:
            rules[name] = (kind, low, max(low, min(high, config[setting])))
    return rules


def check_options(options):
    """Every door: options already parsed must still fit the operator's ceilings (422 names the field)."""
    rules = option_rules()
    for name, value in (options or {}).items():
        if name in rules and not rules[name][1] <= value <= rules[name][2]:
            _, low, high = rules[name]
            raise invalid(f"options.{name}", f"options.{name} must be between {low} and {high}")
    return options or {}


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
