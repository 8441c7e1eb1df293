"""Personal API keys through the API: make one (shown once), list them, revoke one."""
from flask import g, jsonify

from ..auth import api_keys
from ..errors import not_found
from ..service.validation import as_id
from . import bp
from .guard import json_body, token_required


@bp.post("/auth/keys")
@token_required
def create_key():
    data = json_body()
    row, key = api_keys.create(g.api_user, data.get("name"), data.get("expires_in_days"))
    return jsonify({**row.to_dict(), "key": key}), 201, {"Cache-Control": "no-store"}


@bp.get("/auth/keys")
@token_required
def list_keys():
    return jsonify({"keys": [row.to_dict() for row in api_keys.listed(g.api_user.id)]})


@bp.delete("/auth/keys/<int:key_id>")
@token_required
def revoke_key(key_id):
    key_id = as_id(key_id)
    if key_id is None:
        raise not_found("API key")
    api_keys.revoke(g.api_user.id, key_id)
    return "", 204
