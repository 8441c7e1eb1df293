"""No Docker engine runs here, so the compose file and Dockerfile are checked by reading them."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_ports_and_volumes():
    spec = compose()
    assert set(spec["services"]) == {"app", "db", "ollama"}
    app, db, ollama = (spec["services"][name] for name in ("app", "db", "ollama"))
    assert any(str(port).endswith(":8000") for port in app["ports"])
    assert any(str(port).endswith(":11434") for port in ollama["ports"])
    assert "ollama_data:/root/.ollama" in ollama["volumes"]
    assert any(v.startswith("postgres_data:") for v in db["volumes"])
    assert {"postgres_data", "ollama_data"} <= set(spec["volumes"])
    assert "healthcheck" in db and "healthcheck" in ollama
    assert app["depends_on"] == {"db": {"condition": "service_healthy"},
                                 "ollama": {"condition": "service_healthy"}}
    assert app["environment"]["OLLAMA_URL"] == "http://ollama:11434"
    assert app["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@db:5432/" in app["environment"]["DATABASE_URL"]


def test_every_app_setting_is_wired():
    """Each variable in .env.example that the app reads reaches the app container."""
    names = re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M)
    wired = compose()["services"]["app"]["environment"]
    missing = [name for name in names if name not in wired and name not in {"OLLAMA_URL"}]
    assert missing == []


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert text.index("COPY requirements.txt") < text.index("pip install") < text.index("COPY --chown=app:app webapp")
    assert re.search(r"^USER app", text, re.M)
    assert "flask db upgrade && exec gunicorn" in text


def test_compose_cli_accepts_the_file_and_demands_a_secret():
    """`docker compose config` (or docker-compose v1) validates interpolation and the schema."""
    import os
    import shutil
    import subprocess

    import pytest
    if shutil.which("docker-compose"):
        command = ["docker-compose", "config", "-q"]
    elif subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        command = ["docker", "compose", "config", "-q"]
    else:
        pytest.skip("no docker compose CLI here (.ci/run installs Debian's docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    ok = subprocess.run(command, cwd=ROOT, env={**env, "SECRET_KEY": "x" * 40}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "SECRET_KEY" in missing.stderr
