"""Friendly error pages for the browser door."""
from flask import render_template, request
from werkzeug.exceptions import NotFound

# Werkzeug's default descriptions talk to developers; these talk to people.
PLAIN_WORDS = {
    404: ("Not found", "There is nothing here, or it isn't yours to see."),
    405: ("Not allowed", "That address doesn't accept this kind of request."),
    413: ("Too large", "That message is too long to send."),
}


def http_error_page(exc):
    title, message = PLAIN_WORDS.get(exc.code, (exc.name, exc.description))
    if request.headers.get("HX-Request") == "true":
        return message, exc.code, {"Content-Type": "text/plain; charset=utf-8"}
    return render_template("error.html", code=exc.code, title=title, message=message), exc.code


def not_found_page():
    return http_error_page(NotFound())


def csrf_failure(exc):
    """A missing or stale CSRF token is nearly always an old tab or an expired session, not an
    attack: say so, and how to fix it. htmx gets the words as text for the composer's error slot."""
    message = "This form has expired (or came from somewhere else). Reload the page and try again; " \
              "your text was not sent."
    if request.headers.get("HX-Request") == "true":
        return message, 400, {"Content-Type": "text/plain; charset=utf-8"}
    return render_template("error.html", code=400, title="Please reload the page", message=message), 400


def internal_error_page():
    message = "Something went wrong on our side. Your messages are saved; please try again."
    if request.headers.get("HX-Request") == "true":
        return message, 500, {"Content-Type": "text/plain; charset=utf-8"}
    return render_template("error.html", code=500, title="Something went wrong", message=message), 500
