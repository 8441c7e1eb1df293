"""Configuration: environment variables, the legacy Ollama URL, the secret-key guard."""
import subprocess
import sys
from pathlib import Path

import pytest

from webapp import ConfigError, create_app
from webapp.config import ollama_base_url

ROOT = Path(__file__).resolve().parent.parent


def test_ollama_url_forms():
    assert ollama_base_url("http://gpu:11434/") == "http://gpu:11434"
    assert ollama_base_url(None, "http://ollama:11434/api/generate") == "http://ollama:11434"
    assert ollama_base_url(None, None) == "http://localhost:11434"


def test_environment_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("SECRET_KEY", "k" * 40)
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@dbhost/llm")
    monkeypatch.setenv("OLLAMA_API_URL", "http://legacy:11434/api/generate")
    monkeypatch.delenv("OLLAMA_URL", raising=False)
    monkeypatch.setenv("TOKEN_EXPIRES_MINUTES", "5")
    monkeypatch.setenv("DEFAULT_MODEL", "qwen2.5")
    monkeypatch.setenv("LLM_READ_TIMEOUT", "7.5")
    app = create_app()
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u:p@dbhost/llm"
    assert app.config["OLLAMA_URL"] == "http://legacy:11434"
    assert app.config["TOKEN_EXPIRES_MINUTES"] == 5
    assert app.config["DEFAULT_MODEL"] == "qwen2.5"
    assert app.config["LLM_READ_TIMEOUT"] == 7.5


def test_default_database_is_sqlite_under_instance(monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "k" * 40)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    app = create_app()
    assert app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///")
    assert app.config["SQLALCHEMY_DATABASE_URI"].endswith("instance/llm_api_assistant.db")


@pytest.mark.parametrize("key", ["", "dev", "short-key"])
def test_weak_secret_key_refuses_to_start(monkeypatch, key):
    monkeypatch.setenv("SECRET_KEY", key)
    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app()


def test_weak_secret_key_message_is_one_line():
    env = {"PATH": "/usr/bin:/bin", "SECRET_KEY": "dev", "HOME": "/tmp"}
    result = subprocess.run([sys.executable, "-c", "from webapp import create_app; create_app()"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    first = result.stderr.splitlines()[0]
    assert first.startswith("refusing to start: SECRET_KEY is not set")


def test_debug_and_testing_run_without_a_key(monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "")
    assert create_app({"TESTING": True}).config["SECRET_KEY"]


def test_every_setting_is_documented():
    """Every variable config.py reads is listed in .env.example and README.md."""
    import re
    source = (ROOT / "webapp" / "config.py").read_text()
    names = set(re.findall(r'_(?:bool|int|float)\("([A-Z_]+)"', source))
    names |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', source))
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert re.search(rf"^(# )?{name}=", example, re.M), f"{name} missing from .env.example"
        assert name in readme, f"{name} missing from README.md"
