"""The published API description matches the routes that exist."""
import re


def test_every_api_route_is_described_and_nothing_else(app, client):
    spec = client.get("/openapi.json").get_json()
    described = {(path, method) for path, item in spec["paths"].items()
                 for method in item if method in {"get", "post", "patch", "delete", "put"}}
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routed |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert described == routed


def test_spec_names_the_stream_format_and_errors(client):
    spec = client.get("/openapi.json").get_json()
    chat = spec["paths"]["/chat/"]["post"]["responses"]
    assert "text/event-stream" in chat["200"]["content"]
    assert {"401", "409", "422", "503", "504"} <= set(chat)
