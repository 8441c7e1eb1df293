"""The test server itself must speak Ollama's wire format, or every other test proves nothing."""
import json

import pytest
import requests


def test_simple_endpoints(ollama):
    assert requests.get(ollama.url + "/").text == "Ollama is running"
    assert requests.get(ollama.url + "/api/version").json() == {"version": "0.33.0"}
    tags = requests.get(ollama.url + "/api/tags").json()["models"]
    assert tags[0]["name"] == "tinyllama:latest" and len(tags[0]["digest"]) == 64
    assert set(tags[0]["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
    missing = requests.get(ollama.url + "/api/nope")
    assert missing.status_code == 404 and missing.text == "404 page not found"


def test_chat_stream_is_ndjson_with_final_counters(ollama):
    ollama.script(reply="Hello there friend")
    response = requests.post(ollama.url + "/api/chat", json={"model": "tinyllama", "messages": [
        {"role": "user", "content": "hi"}]}, stream=True)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert "".join(line["message"]["content"] for line in lines) == "Hello there friend"
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 3
    assert all(isinstance(final[k], int) for k in ("total_duration", "eval_duration", "prompt_eval_count"))


@pytest.mark.parametrize("body, status, error", [
    (b"", 400, "missing request body"),
    (b"{}", 400, "model is required"),
    (json.dumps({"model": "llama3", "messages": []}).encode(), 404, "model 'llama3' not found"),
])
def test_chat_errors(ollama, body, status, error):
    response = requests.post(ollama.url + "/api/chat", data=body)
    assert response.status_code == status and response.json() == {"error": error}


def test_midstream_error_line_under_200(ollama):
    ollama.script(reply="a b c", fail="midstream", fail_after=1, error="boom")
    response = requests.post(ollama.url + "/api/chat", json={"model": "tinyllama", "messages": [
        {"role": "user", "content": "hi"}]}, stream=True)
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[-1] == {"error": "boom"} and len(lines) == 2


def test_openai_stream_frames(ollama):
    ollama.script(reply="Hi you")
    response = requests.post(ollama.url + "/v1/chat/completions", json={
        "model": "tinyllama", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}}, stream=True)
    frames = [line.decode() for line in response.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    parsed = [json.loads(f[6:]) for f in frames[:-1]]
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop" and parsed[-1]["usage"]["completion_tokens"] == 2
    missing = requests.post(ollama.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
