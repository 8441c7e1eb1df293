"""GET /openapi.json: the JSON API described for programs (OpenAPI 3.1). A test keeps it in step
with the routes, so a new endpoint without a description fails the suite."""
from flask import jsonify

from ..limits import CONVERSATION_PAGE, MAX_ID, MESSAGE_PAGE, MODEL_NAME_MAX, OPTION_RULES, SYSTEM_PROMPT_MAX, TITLE_MAX
from . import bp


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema, description="OK"):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {status: _json(_ref("Error"), text) for status, text in {
    "400": "Malformed JSON or query parameter", "401": "Missing, expired or forged token",
    "404": "Not found (or not yours)",
    "409": "An answer is already being generated",
    "415": "The body is not `Content-Type: application/json`",
    "429": "Too many failed sign-ins: wait `Retry-After` seconds", "422": "A field is wrong; `field` names it",
    "502": "The LLM server failed", "503": "The LLM server cannot be reached", "504": "The LLM server was too slow",
}.items()}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": {"type": "integer"}}
MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": {"type": "integer"}}
# At least one character that is not white space (as Python's str.strip() sees it: \s plus \x1c-\x1f, \x85).
NOT_BLANK = r"[^\s\x1c-\x1f\x85]"
# Each event: `event:` names it, `data:` is one line of JSON (the schema describes one event).
SSE = {"description": "Server-Sent Events: `start`, `token`… then `done` or `error` (data is JSON)",
       "content": {"text/event-stream": {"schema": {"type": "object", "required": ["event", "data"], "properties": {
           "event": {"enum": ["start", "token", "done", "error"]},
           "data": {"type": "string", "contentMediaType": "application/json"}}}}}}


def _errors(*codes):
    return {code: ERRORS[code] for code in codes}


SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "llm_api_assistant", "version": "1.0",
             "description": "Chat with a local LLM. Log in with the OAuth2 password form, then send "
                            "`Authorization: Bearer <token>`. Every response carries `X-Request-ID`."},
    "components": {
        "securitySchemes": {"bearer": {"type": "oauth2", "flows": {"password": {"tokenUrl": "/auth/login",
                                                                                "scopes": {}}}}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"},
                "field": {"type": "string"}, "retry_after": {"type": "integer"}},
                "required": ["code", "message", "request_id"]}}},
            "Options": {"type": "object", "additionalProperties": False, "properties": {
                name: {"type": "number" if kind is float else "integer", "minimum": low, "maximum": high}
                for name, (kind, low, high) in OPTION_RULES.items()}},
            "ChatRequest": {"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string", "pattern": NOT_BLANK}, "conversation_id": {"type": "integer"},
                "model": {"type": "string", "pattern": NOT_BLANK, "maxLength": MODEL_NAME_MAX},
                "stream": {"type": "boolean", "default": False},
                "options": _ref("Options")}},
            "Usage": {"type": "object", "properties": {name: {"type": ["number", "null"]} for name in (
                "prompt_tokens", "completion_tokens", "total_tokens", "total_duration_ms", "load_duration_ms",
                "prompt_eval_duration_ms", "eval_duration_ms", "tokens_per_second")}},
            "TurnResult": {"type": "object", "properties": {
                "request_id": {"type": "string"}, "prompt": {"type": ["string", "null"]},
                "response": {"type": "string"}, "conversation_id": {"type": "integer"},
                "message_id": {"type": "integer"}, "user_message_id": {"type": ["integer", "null"]},
                "model": {"type": "string"},
                "status": {"enum": ["complete", "error", "cancelled", "interrupted"]},
                "done_reason": {"type": ["string", "null"]}, "usage": _ref("Usage")}},
            "Message": {"type": "object", "properties": {
                "id": {"type": "integer"}, "role": {"enum": ["system", "user", "assistant"]},
                "content": {"type": "string"},
                "status": {"enum": ["pending", "streaming", "complete", "error", "cancelled", "interrupted"]},
                "model": {"type": ["string", "null"]}, "usage": _ref("Usage")}},
            "Conversation": {"type": "object", "properties": {
                "id": {"type": "integer"}, "title": {"type": "string"}, "model": {"type": "string"},
                "system_prompt": {"type": "string"}, "message_count": {"type": "integer"},
                "generating": {"type": "boolean"}, "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"}}},
            "ConversationChange": {"type": "object", "properties": {
                "title": {"type": "string", "pattern": NOT_BLANK, "maxLength": TITLE_MAX},
                "model": {"type": "string", "pattern": NOT_BLANK, "maxLength": MODEL_NAME_MAX},
                "system_prompt": {"type": "string", "maxLength": SYSTEM_PROMPT_MAX}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/auth/login": {"post": {
            "summary": "OAuth2 password grant", "security": [],
            "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["username", "password"], "properties": {
                    "username": {"type": "string"}, "password": {"type": "string"},
                    "grant_type": {"const": "password"}, "scope": {"type": "string"}}}}}},
            "responses": {"200": _json({"type": "object", "properties": {
                "access_token": {"type": "string"}, "token_type": {"const": "bearer"},
                "expires_in": {"type": "integer"}}}), **_errors("400", "401", "422", "429", "503")}}},
        "/auth/logout-all": {"post": {
            "summary": "Sign out everywhere: every bearer token and browser session of yours ends",
            "responses": {"204": {"description": "Signed out everywhere; sign in again for a new token"},
                          **_errors("401")}}},
        "/auth/revoke": {"post": {
            "summary": "Sign out everywhere: every bearer token and browser session of yours ends",
            "responses": {"204": {"description": "Revoked; sign in again for a new token"}, **_errors("401")}}},
        "/chat/": {"post": {
            "summary": "One turn: whole JSON answer, or SSE with `stream: true`",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatRequest")}}},
            "responses": {"200": {**_json(_ref("TurnResult")), "content": {
                "application/json": {"schema": _ref("TurnResult")}, **SSE["content"]}},
                **_errors("400", "401", "404", "409", "415", "422", "502", "503", "504")}}},
        "/conversations": {
            "get": {"summary": "Your conversations, newest first", "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                             "maximum": CONVERSATION_PAGE[1]}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "opaque: the `next_cursor` of the previous page (anything else is a 400)"},
                {"name": "q", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "conversations": {"type": "array", "items": _ref("Conversation")},
                    "next_cursor": {"type": ["string", "null"]}}}), **_errors("400", "401")}},
            "post": {"summary": "Create a conversation",
                     "requestBody": {"content": {"application/json": {"schema": _ref("ConversationChange")}}},
                     "responses": {"201": _json(_ref("Conversation"), "Created"),
                                   **_errors("400", "401", "415", "422")}}},
        "/conversations/{conversation_id}": {
            "parameters": [CONVERSATION_ID],
            "get": {"summary": "A conversation with its newest page of messages", "parameters": [
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MESSAGE_PAGE[1]}},
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}],
                "responses": {"200": _json({"allOf": [_ref("Conversation"), {"type": "object", "properties": {
                    "messages": {"type": "array", "items": _ref("Message")},
                    "older_cursor": {"type": ["integer", "null"]}}}]}), **_errors("400", "401", "404")}},
            "patch": {"summary": "Change title, model or system prompt",
                      "requestBody": {"required": True,
                                      "content": {"application/json": {"schema": _ref("ConversationChange")}}},
                      "responses": {"200": _json(_ref("Conversation")), **_errors("400", "401", "404", "415", "422")}},
            "delete": {"summary": "Delete it and its messages",
                       "responses": {"204": {"description": "Deleted"}, **_errors("401", "404")}}},
        "/conversations/{conversation_id}/export": {"parameters": [CONVERSATION_ID], "get": {
            "summary": "The whole conversation as a Markdown file",
            "responses": {"200": {"description": "Markdown, oldest message first",
                                  "content": {"text/markdown": {"schema": {"type": "string"}}}},
                          **_errors("401", "404")}}},
        "/conversations/{conversation_id}/stop": {"parameters": [CONVERSATION_ID], "post": {
            "summary": "Stop the running answer (saved as cancelled)",
            "responses": {"200": _json(_ref("TurnResult")), **_errors("401", "404", "409")}}},
        "/conversations/{conversation_id}/regenerate": {"parameters": [CONVERSATION_ID], "post": {
            "summary": "Answer the last prompt again, replacing the previous answer",
            "responses": {"200": _json(_ref("TurnResult")), **_errors("401", "404", "409", "502", "503", "504")}}},
        "/conversations/{conversation_id}/messages/{message_id}": {
            "parameters": [CONVERSATION_ID, MESSAGE_ID],
            "get": {"summary": "One message", "responses": {"200": _json(_ref("Message")), **_errors("401", "404")}}},
        "/conversations/{conversation_id}/messages/{message_id}/stream": {
            "parameters": [CONVERSATION_ID, MESSAGE_ID],
            "get": {"summary": "Re-attach: replay the answer so far, then follow it to the end",
                    "responses": {"200": SSE, **_errors("401", "404")}}},
        "/models": {"get": {"summary": "Models on the LLM server (cached briefly)", "responses": {
            "200": _json({"type": "object"}), **_errors("401", "503")}}},
        "/health": {"get": {"summary": "Liveness: the app answers (never asks the LLM or the database)",
                            "security": [], "responses": {"200": _json({"type": "object"})}}},
        "/ready": {"get": {"summary": "Readiness: the database answers and is migrated to head; the LLM's "
                                      "state is reported but never makes the app unready", "security": [],
                           "responses": {"200": _json({"type": "object"}),
                                         "503": _json({"type": "object"}, "Not ready: `Retry-After`")}}},
        "/openapi.json": {"get": {"summary": "This description", "security": [],
                                  "responses": {"200": _json({"type": "object"})}}},
    },
}


@bp.get("/openapi.json")
def openapi():
    return jsonify(SPEC)
