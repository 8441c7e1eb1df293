"""GET /docs: the API described by its OpenAPI document, in Swagger UI (vendored from npm's
swagger-ui-dist under static/vendor/swagger-ui/, no CDN), with "Authorize" for the OAuth2 password
flow and for a plain bearer token or API key.

Swagger UI draws its icons as `data:` SVG images, so this page alone gets a Content-Security-Policy
widened by exactly that (`img-src 'self' data:`). Its styles need no 'unsafe-inline': it sets them
through the DOM, which CSP allows, and the Chromium test sees no violation with `style-src 'self'`.
Scripts stay files from this origin (its start-up code is static/js/docs.js). Every other page keeps
the app's strict policy (web/__init__.py sets that one with setdefault, after this view set its own).
"""
from flask import Blueprint, make_response, render_template

from .web import CONTENT_SECURITY_POLICY as STRICT

bp = Blueprint("docs", __name__)

SWAGGER_UI_VERSION = "5.35.0"
CONTENT_SECURITY_POLICY = STRICT.replace("img-src 'self';", "img-src 'self' data:;")
assert CONTENT_SECURITY_POLICY != STRICT


@bp.get("/docs")
def docs():
    response = make_response(render_template("docs.html", swagger_ui_version=SWAGGER_UI_VERSION))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
