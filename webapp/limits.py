"""Every fixed limit and range, defined once: the models size their columns with these, the chat
service validates with them, the OpenAPI document and the templates print them.

Limits an operator can change (prompt length, context budget, ...) live in config.py instead.
"""
TITLE_MAX = 200           # characters in a conversation title
MODEL_NAME_MAX = 200      # characters in a model name
SYSTEM_PROMPT_MAX = 8000  # characters in a conversation's system prompt
TITLE_FROM_PROMPT = 60    # a new conversation's title: the first prompt cut to about this many
SEARCH_QUERY_MAX = 200    # characters of a sidebar search that are used
API_KEY_NAME_MAX = 100   # characters in an API key's name
API_KEY_DAYS_MAX = 3650  # an API key expires after at most this many days (or never)
MAX_ID = 2**31 - 1        # ids are 32-bit INTEGER columns: bigger numbers cannot exist
IDEMPOTENCY_KEY_MAX = 255  # characters in an Idempotency-Key (printable ASCII)
IDEMPOTENCY_KEY_HOURS = 24  # a key is remembered this long; after it, the same key is a new request

# Page sizes: (default, largest a client may ask for).
CONVERSATION_PAGE = (20, 100)
MESSAGE_PAGE = (50, 200)

# Generation options a client may set: name -> (type, minimum, maximum).
OPTION_RULES = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "seed": (int, 0, MAX_ID),
    "num_predict": (int, 1, 16384),
    "num_ctx": (int, 256, 262144),
}
