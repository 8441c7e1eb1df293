"""GET /docs: the API described by its OpenAPI document, in Swagger UI (vendored from npm's
swagger-ui-dist under static/vendor/swagger-ui/, no CDN), with "Authorize" for the OAuth2 password
flow and for a plain bearer token or API key.

Swagger UI renders with inline styles and `data:` images, so this page alone gets a Content-Security-
Policy widened by exactly those two; scripts stay files from this origin (its start-up code is
static/js/docs.js), and every other page keeps the app's strict policy (web/__init__.py sets that one
with setdefault, after this view has set its own).
"""
from flask import Blueprint, make_response, render_template

bp = Blueprint("docs", __name__)

SWAGGER_UI_VERSION = "5.35.0"
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; "
                           "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@bp.get("/docs")
def docs():
    response = make_response(render_template("docs.html", swagger_ui_version=SWAGGER_UI_VERSION))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
