"""`make run` picks an LLM it can reach: configured server, local Ollama, else the bundled tiny model."""
import pytest
import requests

from webapp import launch


def test_configured_backends_are_used_as_they_are():
    assert launch.choose_backend({"LLM_BACKEND": "openai", "OPENAI_BASE_URL": "http://x/v1"}) == {}
    assert launch.choose_backend({"OLLAMA_URL": "http://gpu-box:11434"}) == {}


def test_a_local_ollama_is_preferred(ollama):
    assert launch.choose_backend({}, local_ollama=ollama.url) == {"OLLAMA_URL": ollama.url}


@pytest.mark.real_llm
def test_without_ollama_the_tiny_model_serves(monkeypatch):
    started = []
    monkeypatch.setattr(launch.atexit, "register", started.append)
    env = launch.choose_backend({}, local_ollama="http://127.0.0.1:9")
    try:
        assert env["LLM_BACKEND"] == "openai" and env["DEFAULT_MODEL"] == "smollm2-135m"
        models = requests.get(env["OPENAI_BASE_URL"] + "/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
    finally:
        for stop in started:
            stop()
