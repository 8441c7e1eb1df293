"""CORS for browser-based API clients: off unless CORS_ORIGINS names who may call.

Only the API door gets CORS headers: routes of the `api` and `v1` blueprints, and URLs under an API
prefix that match no route (their 404/405 is JSON a client should be able to read). Pages, /docs and
static files never do: they are the cookie-authenticated door, and no other site may read them.

What an allowed origin gets:
- a preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered 204 right here,
  after only the request id is assigned: no bearer token is asked for (a browser never sends one
  with a preflight), no throttle counts it, nothing reads the database;
- every answer, errors included (401, 404, 429, 503, 500), carries Access-Control-Allow-Origin and
  Access-Control-Expose-Headers, so a script can read the status, the JSON error and Retry-After;
- never Access-Control-Allow-Credentials: the API authenticates with `Authorization: Bearer`, which a
  script sets itself, not with cookies. Without that header a browser lets no script read the answer
  to a cross-origin request that carried this site's cookies (which are SameSite=Lax besides).
A disallowed origin gets no CORS headers at all, so the browser keeps its answer from the script.

`*` allows every origin. It is safe here only because credentials are never allowed: a foreign page
can use the API only with a token its own user typed in, exactly what curl could do. (On an intranet
it does let any site a visitor opens read the unauthenticated /health, /ready and /openapi.json.)
"Null" (sandboxed frames, file:// pages) is refused as an origin: any page can make itself "null".

A small module rather than flask-cors: flask-cors adds headers after the view, so a preflight still
went through /v1's bearer-token check (a 401, which fails the preflight) and needed a hook like the
one below anyway; and its defaults would have to be overridden one by one (it sends the allow-list to
requests without an Origin, treats origins holding regex characters as prefix-matched patterns, and
omits `Vary: Origin` when one origin is configured).
"""
import re

from flask import request

API_BLUEPRINTS = {"api", "v1"}
ALLOW_METHODS = "GET, POST, PATCH, DELETE"
# Authorization is never covered by a `*` in Access-Control-Allow-Headers, so headers are named: these,
# plus whatever else a preflight asks for (OpenAI's JavaScript SDK sends its own X-Stainless-* headers).
# A request header is no risk without credentials: a page can send no more than curl could.
ALLOW_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-Request-ID",
                 "X-Conversation-Id")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
MAX_ASKED_HEADERS = 32
# What a client must be able to read beyond the CORS-safelisted response headers.
EXPOSE_HEADERS = ("Retry-After, X-Request-ID, WWW-Authenticate, Idempotent-Replayed, X-Conversation-Id, "
                  "Location, Content-Disposition")
# Seconds a browser may reuse a preflight's answer (Chromium caps this at 7200, Firefox at 86400).
MAX_AGE = "7200"
WILDCARD = "*"
# scheme://host[:port] as a browser's Origin header spells it: a name, an IPv4 or a bracketed IPv6.
ORIGIN = re.compile(r"https?://(?:[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(?::(\d{1,5}))?")


class CorsConfigError(ValueError):
    pass


def parse_origins(text):
    """'https://a.example, http://localhost:3000' -> a frozenset of origins (lower-case, as browsers
    send them), or {'*'}. What is not an origin (a path, a trailing slash, `null`) refuses to start."""
    origins = set()
    for part in re.split(r"[\s,]+", (text or "").strip()):
        if not part:
            continue
        if part == WILDCARD:
            origins.add(WILDCARD)
            continue
        origin = part.lower()
        match = ORIGIN.fullmatch(origin)
        if not match or not 0 < int(match.group(1) or 1) < 65536:
            raise CorsConfigError(
                f"CORS_ORIGINS: '{part}' is not an origin; write scheme://host[:port] with no path "
                "or trailing slash (e.g. https://app.example.com), or * for any")
        origins.add(origin)
    return frozenset({WILDCARD}) if WILDCARD in origins else frozenset(origins)


def allow_headers(asked):
    """The named headers plus those the preflight asked for (well-formed names only, a bounded number)."""
    names = {name.lower(): name for name in ALLOW_HEADERS}
    for name in [part.strip() for part in asked.split(",")][:MAX_ASKED_HEADERS]:
        if HEADER_NAME.fullmatch(name):
            names.setdefault(name.lower(), name)
    return ", ".join(names.values())


def init_app(app, api_prefixes):
    origins = parse_origins(app.config.get("CORS_ORIGINS", ""))
    if not origins:
        return  # off: not a header changes
    app.extensions["cors_origins"] = origins
    prefixes = tuple(api_prefixes)

    def api_door():
        if request.url_rule is not None:
            return request.blueprint in API_BLUEPRINTS
        return request.path.startswith(prefixes)  # no route: its JSON 404/405 is the API's

    def allowed_origin():
        origin = request.headers.get("Origin")
        if not origin:
            return None
        if WILDCARD in origins:
            return WILDCARD
        return origin if origin.lower() in origins else None

    # The app's own before_request hooks all run before any blueprint's, so this answers before
    # /v1's token check ever sees a preflight.
    @app.before_request
    def answer_preflight():
        if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                and request.url_rule is not None and request.blueprint in API_BLUEPRINTS):
            response = app.response_class(status=204)
            if allowed_origin():
                response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
                response.headers["Access-Control-Allow-Headers"] = allow_headers(
                    request.headers.get("Access-Control-Request-Headers", ""))
                response.headers["Access-Control-Max-Age"] = MAX_AGE
            return response  # the after_request hook below adds the origin
        return None

    @app.after_request
    def cors_headers(response):
        if not api_door():
            return response
        response.vary.add("Origin")  # the answer depends on Origin: no cache may hand it to another
        if request.method == "OPTIONS":
            response.vary.add("Access-Control-Request-Headers")
        origin = allowed_origin()
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response
