"""The chat service: the single place where conversations change and turns happen, shared by the
JSON API (webapp/api/) and the pages (webapp/web/). Views call only what this façade exports.

    conversations  find, list, search, create, change, delete; messages
    turns          start a turn, regenerate, follow an answer, wait for it, stop it
                   (a turn with an Idempotency-Key replays the first one's answer: idempotency.py)
    export         a conversation as Markdown
"""
from .conversations import (
                            create_conversation,
                            decode_cursor,
                            delete_conversation,
                            get_conversation,
                            get_message,
                            list_conversations,
                            list_messages,
                            search_conditions,
                            update_conversation,
)
from .export import export_markdown
from .messages import end_reads, is_active, is_answered, usage_dict
from .turns import (
                            Turn,
                            answer_here,
                            build_context,
                            cancel,
                            follow,
                            regenerate,
                            start_exchange,
                            start_turn,
                            stop,
                            wait_final,
                            wait_here,
)
from .validation import (
                            check_model,
                            clean_model,
                            clean_system_prompt,
                            clean_text,
                            clean_title,
                            known_models,
                            option_rules,
)

__all__ = [
    "create_conversation", "decode_cursor", "delete_conversation", "get_conversation", "get_message",
    "list_conversations", "list_messages", "search_conditions", "update_conversation", "export_markdown",
    "Turn", "answer_here", "build_context", "cancel", "follow", "regenerate", "start_exchange", "start_turn", "stop",
    "wait_final",
    "wait_here",
    "check_model", "known_models", "clean_model", "clean_system_prompt", "clean_text", "clean_title", "option_rules",
    "end_reads", "is_active", "is_answered", "usage_dict",
]
