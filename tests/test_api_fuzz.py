"""The JSON API keeps to its own OpenAPI description under random input (schemathesis + hypothesis):
valid and invalid requests alike never get a 500 or a stack trace, every status is documented, every
body and SSE event matches its schema, and 405s say which methods are allowed."""
import copy
import itertools
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from webapp.api.openapi import SPEC
from webapp.limits import IDEMPOTENCY_KEY_MAX

from helpers import login_token

# The same examples on every run, so CI is repeatable; FUZZ_RANDOM=1 FUZZ_EXAMPLES=500 to hunt further.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"
OPERATIONS = [(path, method.upper()) for path, item in SPEC["paths"].items()
              for method in item if method in {"get", "post", "patch", "delete"}]


def events_one_by_one(spec):
    """Schemathesis reads an OpenAPI 3.1 `text/event-stream` schema as the schema of one event; ours
    is the whole stream (a string, with the grammar in its description, which is what OpenAPI 3.1
    means and what openapi-core and generators read), and each event's schema is under `x-sse-event`.
    Hand schemathesis that one, so every event and its JSON data are checked against the document."""
    spec = copy.deepcopy(spec)
    for item in spec["paths"].values():
        for operation in item.values():
            for response in operation.get("responses", {}).values() if isinstance(operation, dict) else ():
                media = response.get("content", {}).get("text/event-stream")
                if media:
                    media["schema"] = media.pop("x-sse-event")
    return spec


@pytest.fixture
def bearer(client, user):
    return {"Authorization": f"Bearer {login_token(client)}"}


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_api_keeps_to_its_description(app, client, bearer, path, method):
    schema = schemathesis.openapi.from_dict(events_one_by_one(client.get("/openapi.json").get_json()))
    schema.app = app
    operation = schema[path][method]

    # A cursor is opaque: only the ones the server handed out are valid, so a random string that the
    # schema allows is rightly refused with 400 (a documented status, still checked).
    excluded = [positive_data_acceptance] if path == "/conversations" and method == "GET" else []

    serial = itertools.count(1)

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, derandomize=not RANDOM, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            # Only the names GET /models lists (or ALLOWED_MODELS) are models, as a client picks them:
            # any other string the schema allows is rightly refused with 422 unknown_model.
            case.body["model"] = "tinyllama"
        key = (case.headers or {}).get("Idempotency-Key")
        if key is not None:
            # A key names one request: the schema's few short keys, sent again with another body, are
            # rightly refused with 422 idempotency_key_reused. Each case gets a key of its own (same
            # characters, made unique), as a client makes one per request.
            case.headers["Idempotency-Key"] = f"{next(serial)}-{key}"[:IDEMPOTENCY_KEY_MAX]
        case.call_and_validate(headers=bearer, excluded_checks=excluded)
    check()
