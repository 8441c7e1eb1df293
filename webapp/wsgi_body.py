"""Run something when a WSGI response's body is done, without hiding a file from the server.

A WSGI server sends a file with sendfile() (the kernel copies it; no Python per 8 KiB) only when
the body it is given is its own file wrapper (`environ["wsgi.file_wrapper"]`, what werkzeug's
send_file returns for static files). Wrapped in an iterator such as werkzeug's ClosingIterator, the
same file is read and written piece by piece. So for a file wrapper the callback is chained onto
its close() instead, which the server calls when the file is sent (WSGI's rule for any body)."""
from werkzeug.wsgi import ClosingIterator, FileWrapper


def after_body(body, callback, environ):
    """`body`, with `callback()` run once the server closes it (also when closing it fails)."""
    wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
    if not (isinstance(wrapper, type) and isinstance(body, wrapper)):
        return ClosingIterator(body, callback)
    close = getattr(body, "close", None)

    def closed():
        try:
            if close is not None:
                close()
        finally:
            callback()
    body.close = closed
    return body
