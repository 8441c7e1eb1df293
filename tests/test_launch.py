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
    monkeypatch.setenv("PORT", "9")  # the app's port (PORT=... make run) is not the model server's
    env = launch.choose_backend({}, local_ollama="http://127.0.0.1:9")
    try:
        assert env["LLM_BACKEND"] == "openai" and env["DEFAULT_MODEL"] == "smollm2-135m"
        models = requests.get(env["OPENAI_BASE_URL"] + "/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
    finally:
        for stop in started:
            stop()


def test_make_run_serves_with_gevent_workers_and_a_master_free_of_the_app():
    """`make run` (and the tests' live server) start gunicorn as shipped: gevent workers, and a config
    file that imports nothing of the app, so each worker monkey-patches before the app is loaded."""
    import subprocess
    import sys
    command = launch.gunicorn_command()
    printed = subprocess.run(command[:-1] + ["--print-config", command[-1]], cwd=launch.ROOT,
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    import re
    settings = dict(re.findall(r"^(\w+)\s+= (.*)$", printed.stdout, re.M))
    assert settings["worker_class"] == "gevent" and settings["preload_app"] == "False"
    assert int(settings["worker_connections"]) >= 1000
    config_file = command[command.index("-c") + 1]
    check = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
             "assert not [m for m in sys.modules if m == 'webapp' or m.startswith(('flask', 'psycopg', "
             "'sqlalchemy', 'requests'))], 'the config imports the app'")
    loaded = subprocess.run([sys.executable, "-c", check, config_file], capture_output=True, text=True,
                            timeout=60)
    assert loaded.returncode == 0, loaded.stderr
