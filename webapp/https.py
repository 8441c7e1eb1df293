"""Deployment behind HTTPS and reverse proxies: whom to believe about the client, Secure cookies,
HSTS, and no caching of what carries conversations or tokens.

Small WSGI layers around the app, so they see every response whatever order Flask's hooks run
in (flask-login sets its remember cookie in an after_request hook, Flask its session cookie after
all of them):
- TrustedProxies, only with TRUSTED_PROXIES > 0: the client address, scheme and host come from that
  many proxies' X-Forwarded-* headers (werkzeug's ProxyFix), but only when the peer that connected is
  in TRUSTED_PROXY_NETWORKS (CIDRs; empty: nobody). A client that reaches the app's port directly
  sends what it likes in those headers and is not believed: its own address is the one throttled.
- SecureCookies: a response to a request that came over HTTPS marks every cookie it sets Secure, so
  the session never travels over plain HTTP. SESSION_COOKIE_SECURE=1 forces it for every request;
  the same response gets `Strict-Transport-Security: max-age=HSTS_SECONDS` (0: never sent).
- `Cache-Control: no-store` on every response but static files (`response_headers`, an after_request
  hook): conversations, messages, exports, streams and tokens stay out of browser and proxy caches.
"""
import ipaddress
import logging

from flask import request
from werkzeug.middleware.proxy_fix import ProxyFix


class ProxyConfigError(ValueError):
    pass


def wrap(app):
    app.wsgi_app = SecureCookies(app.wsgi_app, app.config["HSTS_SECONDS"])
    hops = app.config["TRUSTED_PROXIES"]
    if hops > 0:  # outermost, so the layers inside see the client's real scheme
        networks = parse_networks(app.config["TRUSTED_PROXY_NETWORKS"])
        if not networks:
            logging.getLogger(__name__).warning(
                "TRUSTED_PROXIES=%s but TRUSTED_PROXY_NETWORKS is empty: X-Forwarded-* is believed from "
                "nobody", hops)
        app.wsgi_app = TrustedProxies(app.wsgi_app, hops, networks)
    app.after_request(response_headers)


def parse_networks(text):
    """'10.0.0.0/8, 127.0.0.1' -> ip_network objects; a malformed entry refuses to start."""
    networks = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ProxyConfigError(f"TRUSTED_PROXY_NETWORKS: '{part}' is not an address or network") from None
    return networks


class TrustedProxies:
    """ProxyFix for requests whose peer is a trusted proxy; everyone else's X-Forwarded-* is ignored."""

    def __init__(self, wsgi_app, hops, networks):
        self.plain = wsgi_app
        self.networks = networks
        self.fixed = ProxyFix(wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)

    def trusted(self, address):
        try:
            peer = ipaddress.ip_address((address or "").split("%")[0])
        except ValueError:
            return False
        if getattr(peer, "ipv4_mapped", None):
            peer = peer.ipv4_mapped
        return any(peer in network for network in self.networks)

    def __call__(self, environ, start_response):
        if self.networks and self.trusted(environ.get("REMOTE_ADDR")):
            return self.fixed(environ, start_response)
        return self.plain(environ, start_response)


def response_headers(response):
    """no-store on everything but static files (see the module's docstring)."""
    if request.endpoint != "static" and "no-store" not in response.headers.get("Cache-Control", ""):
        response.headers["Cache-Control"] = "no-store"
    return response


def _is_secure(cookie):
    return "secure" in {part.strip().lower() for part in cookie.split(";")[1:]}


class SecureCookies:
    def __init__(self, wsgi_app, hsts_seconds=0):
        self.wsgi_app = wsgi_app
        self.hsts = f"max-age={hsts_seconds}" if hsts_seconds > 0 else None

    def __call__(self, environ, start_response):
        if environ.get("wsgi.url_scheme") != "https":
            return self.wsgi_app(environ, start_response)

        def start(status, headers, exc_info=None):
            headers = [(name, value + "; Secure" if name.lower() == "set-cookie" and not _is_secure(value)
                        else value) for name, value in headers]
            if self.hsts and not any(name.lower() == "strict-transport-security" for name, _ in headers):
                headers.append(("Strict-Transport-Security", self.hsts))
            return start_response(status, headers, exc_info)
        return self.wsgi_app(environ, start)
