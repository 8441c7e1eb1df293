"""The page door's error renderer: words where the person looks (see the table in webapp/errors.py),
friendly pages for HTTP errors, CSRF failures and the unexpected."""
from flask import render_template, request
from werkzeug.exceptions import NotFound

from ..errors import LLMError, ServiceError
from . import bp
from .htmx import is_htmx, retarget

# Werkzeug's default descriptions talk to developers; these talk to people.
PLAIN_WORDS = {
    404: ("Not found", "There is nothing here, or it isn't yours to see."),
    405: ("Not allowed", "That address doesn't accept this kind of request."),
    413: ("Too large", "That message is too long to send."),
}

# Where each page action shows what went wrong (the slot's id in the page), by endpoint.
ERROR_SLOTS = {
    "web.new_chat": "composer-error",
    "web.send": "composer-error",
    "web.rename": "rename-error",
    "web.conversation_settings": "settings-error",
    "web.stop": "answer-error-{message_id}",
    "web.regenerate": "answer-error-{message_id}",
}


def error_slot():
    """The id of the element that shows this action's error (None: the action has no slot)."""
    slot = ERROR_SLOTS.get(request.endpoint)
    if slot and "{message_id}" in slot:
        message_id = request.form.get("message_id", "")
        slot = slot.format(message_id=message_id) if message_id.isascii() and message_id.isdigit() else None
    return slot


@bp.errorhandler(ServiceError)
def service_error(exc):
    if exc.status == 404:  # someone else's id looks exactly like a missing one
        return not_found_page()
    return show_error(exc.message, exc.status)


@bp.errorhandler(LLMError)
def llm_error(exc):
    return show_error(exc.message, exc.status)


def show_error(message, status):
    """htmx: the words into the action's slot. A plain form: the chat page again, with the words in
    the same slot and what was typed kept. Anything else: a page of its own."""
    slot = error_slot()
    if is_htmx() and slot:
        return retarget(render_template("_error_words.html", message=message), f"#{slot}")
    if is_htmx():
        return message, status, {"Content-Type": "text/plain; charset=utf-8"}
    if slot:
        from .views import render_chat  # the page renderer lives with the page views
        return render_chat((request.view_args or {}).get("conversation_id"), errors={slot: message},
                           draft=request.form.get("prompt", ""), status=status)
    return render_template("error.html", code=status, title="That didn't work", message=message), status


def http_error_page(exc):
    title, message = PLAIN_WORDS.get(exc.code, (exc.name, exc.description))
    if is_htmx():
        response = (message, exc.code, {"Content-Type": "text/plain; charset=utf-8"})
    else:
        response = (render_template("error.html", code=exc.code, title=title, message=message), exc.code)
    return response


def not_found_page():
    return http_error_page(NotFound())


def csrf_failure(exc):
    """A missing or stale CSRF token is nearly always an old tab or an expired session, not an
    attack: say so, and how to fix it. htmx gets the words as text for the composer's error slot."""
    message = "This form has expired (or came from somewhere else). Reload the page and try again; " \
              "your text was not sent."
    if is_htmx():
        return message, 400, {"Content-Type": "text/plain; charset=utf-8"}
    return render_template("error.html", code=400, title="Please reload the page", message=message), 400


def internal_error_page():
    message = "Something went wrong on our side. Your messages are saved; please try again."
    if is_htmx():
        return message, 500, {"Content-Type": "text/plain; charset=utf-8"}
    return render_template("error.html", code=500, title="Something went wrong", message=message), 500
