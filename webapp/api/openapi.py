"""GET /openapi.json: the JSON API described for programs (OpenAPI 3.1). A test keeps it in step
with the routes, so a new endpoint without a description fails the suite; others check it with
openapi-spec-validator, validate real answers with openapi-core, and build a client from it with
openapi-python-client. Every operation has an operationId (generated clients name their functions
after it) and documents 405; streams are `text/event-stream` strings whose grammar is in the
description (OpenAPI 3.1 cannot type the events themselves), with each event's data schema in
`x-sse-event` and under components."""
import copy

from flask import jsonify, request

from ..limits import (
    API_KEY_DAYS_MAX,
    API_KEY_NAME_MAX,
    CONVERSATION_PAGE,
    IDEMPOTENCY_KEY_HOURS,
    IDEMPOTENCY_KEY_MAX,
    MAX_ID,
    MESSAGE_PAGE,
    MODEL_NAME_MAX,
    OPTION_RULES,
    SYSTEM_PROMPT_MAX,
    TITLE_MAX,
)
from ..service import option_rules
from . import bp


def options_schema(rules):
    return {"type": "object", "additionalProperties": False, "properties": {
        name: {"type": "number" if kind is float else "integer", "minimum": low, "maximum": high}
        for name, (kind, low, high) in rules.items()}}


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema, description="OK"):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {status: _json(_ref("Error"), text) for status, text in {
    "400": "Malformed JSON or query parameter", "401": "Missing, expired or forged token",
    "404": "Not found (or not yours)",
    "409": "An answer is already being generated (or: too many API keys)",
    "415": "The body is not `Content-Type: application/json`",
    "429": "Too many answers: `too_many_answers` (unfinished at once, or started this minute); wait "
           "`Retry-After` seconds",
    "422": "A field is wrong; `field` names it (`unknown_model`: a model this server does not offer; "
           "`invalid_field`: e.g. an option above the server's ceiling)",
    "502": "The LLM server failed", "503": "The LLM server cannot be reached", "504": "The LLM server was too slow",
}.items()}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": {"type": "integer"}}
MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": {"type": "integer"}}
# At least one character that is not white space (as Python's str.strip() sees it: \s plus \x1c-\x1f, \x85).
NOT_BLANK = r"[^\s\x1c-\x1f\x85]"
SSE_GRAMMAR = """Server-Sent Events (WHATWG HTML §9.2), UTF-8. Each event is an `id:` line, one `event:`
line, one `data:` line of JSON and a blank line; the first event also has a `retry:` line (milliseconds
an EventSource waits before reconnecting); lines starting with `:` are heartbeats to ignore:

```
stream  = start *( queued / ping ) *( token / ping ) ( done / failed / signed_out )
start   = [ "retry: " ms LF ] "id: " offset LF "event: start" LF "data: " StreamStart LF LF
queued  = "event: queued" LF "data: " StreamQueued LF LF ; waiting for the model: place in line (1 = next)
token   = "id: " offset LF "event: token"  LF "data: " StreamToken LF LF  ; the next piece of the answer
ping    = ": ping" LF LF
done    = "id: " offset LF "event: done"   LF "data: " TurnResult LF LF   ; status complete or cancelled
failed  = "id: " offset LF "event: failed" LF "data: " TurnResult LF LF   ; the answer failed; `error` says why
signed_out = "event: signed_out" LF "data: " StreamSignedOut LF LF        ; the token or account ended
offset  = 1*DIGIT  ; the answer's length in characters (Unicode code points) after this event
```

A stream ends with `signed_out` within 5 s of its token ending (sign out everywhere, revoke, password
change) or its account being disabled; the answer itself goes on being generated and saved. It has no
`id:` (a reconnect with the same credential is refused with 401).

**Resuming.** A client that lost the connection asks
`GET /conversations/{conversation_id}/messages/{message_id}/stream` with `Last-Event-ID: <the last id it
got>` (or `?last_event_id=` where headers cannot be set): the stream goes on exactly after that
offset, with no character repeated or lost, from any worker. Without it the answer is replayed from
the start. A reconnect whose id is already at the end of a finished answer gets `204 No Content`, so an
EventSource stops; read the message (`GET …/messages/{message_id}`) for its final status if the `done`
event was lost. (Until 2.0.0 the failure event was named `error`, which clashes with EventSource's own
connection `error` event.)

Each event's data schema is under `components/schemas`, and `x-sse-event` is the JSON Schema of one
parsed event (`event`, `data`, `id`, and `retry` when sent), for tools that check events one by one."""
SSE_EVENTS = {"start": "StreamStart", "queued": "StreamQueued", "token": "StreamToken", "done": "TurnResult",
              "failed": "TurnResult", "signed_out": "StreamSignedOut"}
NO_ID_EVENTS = ("queued", "signed_out")  # not a position in the answer: no `id:`
SSE_EVENT = {"oneOf": [{"type": "object", "required": ["event", "data"] + ([] if name in NO_ID_EVENTS else ["id"]),
                        "properties": {
    "event": {"const": name}, "id": {"type": "string", "pattern": "^[0-9]+$"}, "retry": {"type": "integer"},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(schema)}}}
    for name, schema in SSE_EVENTS.items()]}
SSE_MEDIA = {"text/event-stream": {"schema": {"type": "string", "description": SSE_GRAMMAR},
                                   "x-sse-event": SSE_EVENT}}
SSE = {"description": "The answer as Server-Sent Events:\n\n" + SSE_GRAMMAR, "content": SSE_MEDIA}
MODEL = {"type": "string", "pattern": NOT_BLANK, "maxLength": MODEL_NAME_MAX,
         "description": "a name `GET /models` lists (`llama3.2` stands for `llama3.2:latest`), or one the "
                        "operator allows; any other is refused with 422 `unknown_model`"}
IDEMPOTENCY = f"""**Safe retries.** Send `Idempotency-Key: <a new UUID>` (1 to {IDEMPOTENCY_KEY_MAX} printable
ASCII characters; the quoted form `"…"` of draft-ietf-httpapi-idempotency-key-header names the same key)
and retry with the same key and the same body when the connection drops or times out: the retry gets
the first attempt's answer — the same `message_id` and `conversation_id`, with `Idempotent-Replayed:
true` — waiting for it while it is generated, and no second answer is started. A retried stream
replays the answer from the start, or continues after `Last-Event-ID`. Requests racing with one key
make one answer. Keys are per person and remembered for {IDEMPOTENCY_KEY_HOURS} hours; the key with
another body (prompt, conversation, model or options; `stream` does not count) is a 422
`idempotency_key_reused`. A failed answer is replayed as its failure: use a new key to try again."""
IDEMPOTENCY_PARAMETERS = [
    {"name": "Idempotency-Key", "in": "header", "required": False,
     "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX,
                "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$"},
     "description": "makes a retry return (or re-attach to) the first attempt's answer; see the description"},
    {"name": "Last-Event-ID", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
     "description": "with `Idempotency-Key` and `stream: true`, on a retry: the `id` of the last event received; "
                    "the replay goes on right after it (ignored on a first attempt)"}]
REPLAYED = {"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                                    "description": "this is a retry's answer: the first attempt's, not a new one"}}
METHOD_NOT_ALLOWED = _json(_ref("Error"), "This path does not take this method; `Allow` lists those it takes")
METHOD_NOT_ALLOWED["headers"] = {"Allow": {"schema": {"type": "string"}, "description": "e.g. `GET, POST`"}}


def _errors(*codes):
    return {code: ERRORS[code] for code in codes}


SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "llm_api_assistant", "version": "2.0.0",
             "description": "Chat with a local LLM. Log in with the OAuth2 password form at `/auth/login` "
                            "(RFC 6749 §4.3), then send `Authorization: Bearer <token>`. Every response "
                            "carries `X-Request-ID`. Errors are `{\"error\": {code, message, request_id}}`, "
                            "except the token endpoint's, which follow RFC 6749 §5.2. Personal API keys "
                            "(`llmk_...`, made at `/auth/keys`) work as bearer tokens too. `/v1` is "
                            "OpenAI's chat API (models, chat completions) for OpenAI clients: it follows "
                            "OpenAI's own description and is not repeated here (it takes `Idempotency-Key` "
                            "as `POST /chat/` does)."},
    "servers": [{"url": "/", "description": "this server"}],
    "components": {
        "securitySchemes": {
            "OAuth2Password": {"type": "oauth2", "description": "Username and password for a bearer token",
                               "flows": {"password": {"tokenUrl": "/auth/login", "scopes": {}}}},
            "BearerToken": {"type": "http", "scheme": "bearer",
                            "description": "A token from `/auth/login` (or a personal API key), as "
                                           "`Authorization: Bearer <token>`"}},
        "schemas": {
            "Token": {"type": "object", "required": ["access_token", "token_type", "expires_in"], "properties": {
                "access_token": {"type": "string"}, "token_type": {"type": "string", "enum": ["bearer"]},
                "expires_in": {"type": "integer", "description": "seconds"}}},
            "TokenError": {"type": "object", "required": ["error", "error_description", "request_id"],
                           "description": "RFC 6749 §5.2", "properties": {
                "error": {"type": "string", "enum": ["invalid_request", "invalid_grant", "unsupported_grant_type",
                                                     "too_many_attempts", "temporarily_unavailable"]},
                "error_description": {"type": "string"}, "request_id": {"type": "string"},
                "retry_after": {"type": "integer", "description": "on 429: seconds to wait, as `Retry-After`"}}},
            "StreamStart": {"type": "object", "required": ["request_id", "conversation_id", "message_id", "model"],
                            "properties": {
                "request_id": {"type": "string"}, "conversation_id": {"type": "integer"},
                "message_id": {"type": "integer"}, "user_message_id": {"type": ["integer", "null"]},
                "model": {"type": "string"}}},
            "StreamQueued": {"type": "object", "required": ["position"], "description":
                             "Sent while the answer waits for a free slot at the model (the server runs at "
                             "most `LLM_MAX_PARALLEL` answers per model at once, taking people in turn), "
                             "each time its place changes; none when it starts at once",
                             "properties": {"position": {"type": "integer", "minimum": 1,
                                                         "description": "place in line: 1 = next to run"}}},
            "StreamToken": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
            "StreamSignedOut": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "enum": ["signed_out", "account_disabled"]},
                "message": {"type": "string"}}},
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"},
                "field": {"type": "string"}, "retry_after": {"type": "integer"}},
                "required": ["code", "message", "request_id"]}}},
            "Options": options_schema(OPTION_RULES),  # maxima of the running configuration: see openapi()
            "ChatRequest": {"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string", "pattern": NOT_BLANK}, "conversation_id": {"type": "integer"},
                "model": MODEL,
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
                "status": {"type": "string", "enum": ["complete", "error", "cancelled", "interrupted"]},
                "done_reason": {"type": ["string", "null"]}, "usage": _ref("Usage"),
                "error": {"type": ["object", "null"], "description": "why the answer failed", "properties": {
                    "code": {"type": "string"}, "message": {"type": ["string", "null"]}}}}},
            "Message": {"type": "object", "properties": {
                "id": {"type": "integer"}, "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                "content": {"type": "string"},
                "status": {"type": "string",
                           "enum": ["queued", "pending", "streaming", "complete", "error", "cancelled",
                                    "interrupted"]},
                "model": {"type": ["string", "null"]}, "usage": _ref("Usage")}},
            "Conversation": {"type": "object", "properties": {
                "id": {"type": "integer"}, "title": {"type": "string"}, "model": {"type": "string"},
                "system_prompt": {"type": "string"}, "message_count": {"type": "integer"},
                "generating": {"type": "boolean"},
                "source": {"type": "string", "enum": ["web", "api"],
                           "description": "`api`: made through the OpenAI-compatible `/v1`"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"}}},
            "ApiKey": {"type": "object", "required": ["id", "name", "prefix", "created_at"], "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"},
                "prefix": {"type": "string", "description": "the key's first characters, to tell keys apart"},
                "created_at": {"type": "string", "format": "date-time"},
                "last_used_at": {"type": ["string", "null"], "format": "date-time",
                                 "description": "updated at most once a minute"},
                "expires_at": {"type": ["string", "null"], "format": "date-time"},
                "revoked_at": {"type": ["string", "null"], "format": "date-time"}}},
            "NewApiKey": {"allOf": [_ref("ApiKey"), {"type": "object", "required": ["key"], "properties": {
                "key": {"type": "string", "pattern": "^llmk_",
                        "description": "the key itself: shown this once, never stored"}}}]},
            "ConversationChange": {"type": "object", "properties": {
                "title": {"type": "string", "pattern": NOT_BLANK, "maxLength": TITLE_MAX},
                "model": MODEL,
                "system_prompt": {"type": "string", "maxLength": SYSTEM_PROMPT_MAX}}},
        },
    },
    "security": [{"OAuth2Password": []}, {"BearerToken": []}],
    "paths": {
        "/auth/login": {"post": {
            "operationId": "login", "summary": "OAuth2 password grant: a bearer token (RFC 6749 §4.3)",
            "description": "Each parameter at most once. `grant_type` may be omitted. Answers are never "
                           "cached (`Cache-Control: no-store`). Wrong username or password: 400 "
                           "`invalid_grant`; a missing or repeated parameter: 400 `invalid_request`.",
            "security": [],
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["username", "password"], "properties": {
                    "username": {"type": "string", "minLength": 1},
                    "password": {"type": "string", "minLength": 1},
                    "grant_type": {"type": "string", "enum": ["password"]}, "scope": {"type": "string"}}}}}},
            "responses": {"200": _json(_ref("Token"), "A bearer token"),
                          "400": _json(_ref("TokenError"), "`invalid_request`, `invalid_grant` or "
                                                           "`unsupported_grant_type`"),
                          "429": {**_json(_ref("TokenError"), "`too_many_attempts`: too many failed sign-ins; "
                                                              "wait `Retry-After` seconds"),
                                  "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
                          "503": {**_json(_ref("TokenError"), "`temporarily_unavailable`: too many sign-ins are "
                                                              "waiting; retry after `Retry-After` seconds"),
                                  "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}}},
        "/auth/logout-all": {"post": {
            "operationId": "logoutAll",
            "summary": "Sign out everywhere: every bearer token and browser session of yours ends",
            "responses": {"204": {"description": "Signed out everywhere; sign in again for a new token"},
                          **_errors("401")}}},
        "/auth/revoke": {"post": {
            "operationId": "revokeToken",
            "summary": "Token revocation (RFC 7009): end one access token or API key",
            "description": "Send the token itself as `token`; that one token (or `llmk_` key) stops working "
                           "at once on every worker, and streams it opened end within 5 s. Your other "
                           "tokens, keys and browser sessions go on (to end them all: `/auth/logout-all`). "
                           "No client authentication: holding the token is the proof. The answer is 200 "
                           "whatever the token was (live, already revoked, expired, unknown), as RFC 7009 "
                           "§2.2 says. `token_type_hint` is accepted and ignored. Each parameter at most "
                           "once, in the body, never in the URL. Every well-formed request counts against "
                           "a per-address limit (`REVOKE_LIMIT_PER_ADDRESS`).",
            "security": [],
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["token"], "properties": {
                    "token": {"type": "string", "minLength": 1,
                              "description": "an access token from `/auth/login`, or an API key `llmk_...`"},
                    "token_type_hint": {"type": "string", "examples": ["access_token"],
                                        "description": "ignored: the token's form tells what it is"}}}}}},
            "responses": {"200": {**_json({"type": "object", "maxProperties": 0},
                                          "Done: the token no longer works (or never did)"),
                                  "headers": {"Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}}}},
                          "400": _json(_ref("TokenError"), "`invalid_request`: no `token`, a parameter sent "
                                                           "twice, the token in the URL, or a body that is not "
                                                           "a form"),
                          "429": {**_json(_ref("TokenError"), "`too_many_attempts`: too many revocations from "
                                                              "your address; wait `Retry-After` seconds"),
                                  "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
                          "503": {**_json(_ref("TokenError"), "`temporarily_unavailable`: retry after "
                                                              "`Retry-After` seconds"),
                                  "headers": {"Retry-After": {"schema": {"type": "integer"}}}}}}},
        "/auth/keys": {
            "get": {"operationId": "listApiKeys", "summary": "Your personal API keys (not revoked), newest first",
                    "responses": {"200": _json({"type": "object", "required": ["keys"], "properties": {
                        "keys": {"type": "array", "items": _ref("ApiKey")}}}), **_errors("401")}},
            "post": {"operationId": "createApiKey",
                     "summary": "Make a personal API key (`llmk_...`); the key is in this answer only",
                     "description": "Use it as `Authorization: Bearer llmk_...` on every API route and on "
                                    "`/v1`. It survives a password change and signing out everywhere; it ends "
                                    "when revoked, when it expires, or when the account is disabled.",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["name"], "properties": {
                             "name": {"type": "string", "pattern": NOT_BLANK, "maxLength": API_KEY_NAME_MAX},
                             "expires_in_days": {"type": ["integer", "null"], "minimum": 1,
                                                 "maximum": API_KEY_DAYS_MAX,
                                                 "description": "null or absent: never expires"}}}}}},
                     "responses": {"201": _json(_ref("NewApiKey"), "Made"),
                                   **_errors("400", "401", "409", "415", "422")}}},
        "/auth/keys/{key_id}": {
            "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "delete": {"operationId": "revokeApiKey", "summary": "Revoke one of your API keys, at once everywhere",
                       "responses": {"204": {"description": "Revoked"}, **_errors("401", "404")}}},
        "/chat/": {"post": {
            "operationId": "chatTurn", "summary": "One turn: whole JSON answer, or SSE with `stream: true`",
            "description": IDEMPOTENCY, "parameters": IDEMPOTENCY_PARAMETERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatRequest")}}},
            "responses": {"200": {**_json(_ref("TurnResult")), "content": {
                "application/json": {"schema": _ref("TurnResult")}, **SSE["content"]}, "headers": REPLAYED},
                "204": {"description": "A retried stream whose `Last-Event-ID` is already at the end of the "
                                       "finished answer: nothing more will come (no body)", "headers": REPLAYED},
                **_errors("401", "404", "409", "415", "429", "502", "503", "504"),
                "400": _json(_ref("Error"), "Malformed JSON, `invalid_idempotency_key` (not 1 to "
                                            f"{IDEMPOTENCY_KEY_MAX} printable ASCII characters) or "
                                            "`invalid_last_event_id`"),
                "422": _json(_ref("Error"), ERRORS["422"]["description"] + "; `idempotency_key_reused`: this "
                                            "`Idempotency-Key` came with another request before")}}},
        "/conversations": {
            "get": {"operationId": "listConversations", "summary": "Your conversations, newest first", "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                             "maximum": CONVERSATION_PAGE[1]}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "opaque: the `next_cursor` of the previous page (anything else is a 400)"},
                {"name": "q", "in": "query", "schema": {"type": "string"}},
                {"name": "source", "in": "query", "schema": {"type": "string", "enum": ["web", "api"]},
                 "description": "only conversations made through that door (`api`: the OpenAI-compatible `/v1`)"}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "conversations": {"type": "array", "items": _ref("Conversation")},
                    "next_cursor": {"type": ["string", "null"]}}}), **_errors("400", "401")}},
            "post": {"operationId": "createConversation", "summary": "Create a conversation",
                     "requestBody": {"content": {"application/json": {"schema": _ref("ConversationChange")}}},
                     "responses": {"201": _json(_ref("Conversation"), "Created"),
                                   **_errors("400", "401", "415", "422")}}},
        "/conversations/{conversation_id}": {
            "parameters": [CONVERSATION_ID],
            "get": {"operationId": "getConversation",
                    "summary": "A conversation with its newest page of messages", "parameters": [
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MESSAGE_PAGE[1]}},
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}],
                "responses": {"200": _json({"allOf": [_ref("Conversation"), {"type": "object", "properties": {
                    "messages": {"type": "array", "items": _ref("Message")},
                    "older_cursor": {"type": ["integer", "null"]}}}]}), **_errors("400", "401", "404")}},
            "patch": {"operationId": "updateConversation", "summary": "Change title, model or system prompt",
                      "requestBody": {"required": True,
                                      "content": {"application/json": {"schema": _ref("ConversationChange")}}},
                      "responses": {"200": _json(_ref("Conversation")), **_errors("400", "401", "404", "415", "422")}},
            "delete": {"operationId": "deleteConversation", "summary": "Delete it and its messages",
                       "responses": {"204": {"description": "Deleted"}, **_errors("401", "404")}}},
        "/conversations/{conversation_id}/export": {"parameters": [CONVERSATION_ID], "get": {
            "operationId": "exportConversation", "summary": "The whole conversation as a Markdown file",
            "responses": {"200": {"description": "Markdown, oldest message first",
                                  "content": {"text/markdown": {"schema": {"type": "string"}}}},
                          **_errors("401", "404")}}},
        "/conversations/{conversation_id}/stop": {"parameters": [CONVERSATION_ID], "post": {
            "operationId": "stopAnswer", "summary": "Stop the running answer (saved as cancelled)",
            "responses": {"200": _json(_ref("TurnResult")), **_errors("401", "404", "409")}}},
        "/conversations/{conversation_id}/regenerate": {"parameters": [CONVERSATION_ID], "post": {
            "operationId": "regenerateAnswer", "summary": "Answer the last prompt again, replacing the previous answer",
            "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                "model": MODEL,
                "stream": {"type": "boolean", "default": False}, "options": _ref("Options")}}}}},
            "responses": {"200": {**_json(_ref("TurnResult")), "content": {
                "application/json": {"schema": _ref("TurnResult")}, **SSE["content"]}},
                **_errors("400", "401", "404", "409", "415", "422", "429", "502", "503", "504")}}},
        "/conversations/{conversation_id}/messages/{message_id}": {
            "parameters": [CONVERSATION_ID, MESSAGE_ID],
            "get": {"operationId": "getMessage", "summary": "One message",
                    "responses": {"200": _json(_ref("Message")), **_errors("401", "404")}}},
        "/conversations/{conversation_id}/messages/{message_id}/stream": {
            "parameters": [CONVERSATION_ID, MESSAGE_ID],
            "get": {"operationId": "streamMessage",
                    "summary": "Re-attach: replay the answer so far (or resume after `Last-Event-ID`), "
                               "then follow it to the end",
                    "parameters": [
                        {"name": "Last-Event-ID", "in": "header", "required": False,
                         "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                         "description": "the `id` of the last event received: resume right after it"},
                        {"name": "last_event_id", "in": "query", "required": False,
                         "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                         "description": "the same, for clients that cannot set headers (the header wins)"}],
                    "responses": {"200": SSE,
                                  "204": {"description": "`Last-Event-ID` is already at the end of a finished "
                                                         "answer: nothing more will come (no body)"},
                                  **_errors("400", "401", "404")}}},
        "/models": {"get": {"operationId": "listModels", "summary": "Models on the LLM server (cached briefly)",
                            "responses": {
            "200": _json({"type": "object"}), **_errors("401", "503")}}},
        "/health": {"get": {"operationId": "health",
                            "summary": "Liveness: the app answers (never asks the LLM or the database)",
                            "security": [], "responses": {"200": _json({"type": "object"})}}},
        "/ready": {"get": {"operationId": "ready",
                           "summary": "Readiness: the database answers and is migrated to head; the LLM's "
                                      "state is reported but never makes the app unready", "security": [],
                           "responses": {"200": _json({"type": "object"}),
                                         "503": _json({"type": "object"}, "Not ready: `Retry-After`")}}},
        "/openapi.json": {"get": {"operationId": "getOpenApi", "summary": "This description", "security": [],
                                  "responses": {"200": _json({"type": "object"})}}},
    },
}

# POST /chat answers exactly as POST /chat/ does, so a JSON client that drops the slash never lands on
# a page (the page's new-chat form posts to /c/new).
SPEC["paths"]["/chat"] = {"post": {**SPEC["paths"]["/chat/"]["post"], "operationId": "chatWithoutSlash",
                                   "summary": "The same as POST /chat/ (without the trailing slash)"}}



def _complete(spec):
    """What every operation shares: 405 (with `Allow`) and the RFC 6750 challenge on 401; 429s carry
    `Retry-After`."""
    for item in spec["paths"].values():
        for method, operation in item.items():
            if method in {"get", "post", "patch", "delete", "put"}:
                operation["responses"].setdefault("405", METHOD_NOT_ALLOWED)
                if operation["responses"].get("429") is ERRORS["429"]:
                    operation["responses"]["429"] = {**ERRORS["429"], "headers": {
                        "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}}
                if "401" in operation["responses"]:
                    operation["responses"]["401"] = {**ERRORS["401"], "headers": {"WWW-Authenticate": {
                        "schema": {"type": "string"},
                        "description": 'RFC 6750 §3: `Bearer realm="api"`, with `error="invalid_token"` '
                                       "and `error_description` when a token was sent but is bad or expired"}}}
    return spec


_complete(SPEC)


@bp.get("/openapi.json")
def openapi():
    """The description with this server's own address under `servers`, for tools that need a whole URL."""
    spec = copy.copy(SPEC)
    spec["servers"] = [{"url": request.url_root.rstrip("/"), "description": "this server"}]
    # The options' maxima as this server enforces them (LLM_MAX_NUM_CTX, LLM_MAX_NUM_PREDICT).
    spec["components"] = {**SPEC["components"], "schemas": {**SPEC["components"]["schemas"],
                                                            "Options": options_schema(option_rules())}}
    return jsonify(spec)
