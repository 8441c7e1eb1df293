"""Deployment behind HTTPS and reverse proxies: whom to believe about the client, and Secure cookies.

Two small WSGI layers around the app, so they see every response whatever order Flask's hooks run
in (flask-login sets its remember cookie in an after_request hook, Flask its session cookie after
all of them):
- ProxyFix, only with TRUSTED_PROXIES > 0: the client address, scheme and host come from that many
  proxies' X-Forwarded-* headers. Off by default, since any client can send those headers.
- SecureCookies: a response to a request that came over HTTPS marks every cookie it sets Secure, so
  the session never travels over plain HTTP. SESSION_COOKIE_SECURE=1 forces it for every request.
"""
from werkzeug.middleware.proxy_fix import ProxyFix


def wrap(app):
    app.wsgi_app = SecureCookies(app.wsgi_app)
    hops = app.config["TRUSTED_PROXIES"]
    if hops > 0:  # outermost, so the layers inside see the client's real scheme
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)


def _is_secure(cookie):
    return "secure" in {part.strip().lower() for part in cookie.split(";")[1:]}


class SecureCookies:
    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        if environ.get("wsgi.url_scheme") != "https":
            return self.wsgi_app(environ, start_response)

        def start(status, headers, exc_info=None):
            headers = [(name, value + "; Secure" if name.lower() == "set-cookie" and not _is_secure(value)
                        else value) for name, value in headers]
            return start_response(status, headers, exc_info)
        return self.wsgi_app(environ, start)
