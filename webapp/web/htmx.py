"""htmx responses, django-htmx style: every view asks `request.htmx` (htmx-flask) and answers through
these helpers instead of writing HX-* headers by hand."""
from flask import redirect
from htmx_flask import make_response, request


def is_htmx():
    return bool(request.htmx)


def go_to(url):
    """A full-page move: htmx follows HX-Redirect (a swap would land a page inside a fragment);
    a plain form gets the usual 302."""
    if is_htmx():
        return make_response("", 204, redirect=url)
    return redirect(url)


def retarget(html, selector, status=200):
    """Swap `html` into `selector` instead of the element that made the request (error slots)."""
    return make_response(html, status, retarget=selector, reswap="innerHTML")
