"""No Docker engine runs here, so the compose file and Dockerfile are checked by reading them."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def defaults(value):
    """A compose value with each ${VAR:-default} / ${VAR-default} / ${VAR} replaced by its default."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", str(value))


def published(service):
    """(host address, host port, container port/protocol) for each published port, defaults applied."""
    result = []
    for entry in service.get("ports", []):
        parts = defaults(entry).split(":")
        address = parts[0] if len(parts) == 3 else "0.0.0.0"
        target = parts[-1] if "/" in parts[-1] else parts[-1] + "/tcp"
        result.append((address, parts[-2], target))
    return result


def test_services_volumes_and_wiring():
    spec = compose()
    assert set(spec["services"]) == {"app", "db", "ollama", "proxy", "proxy-https"}
    app, db, ollama = (spec["services"][name] for name in ("app", "db", "ollama"))
    assert "ollama_data:/root/.ollama" in ollama["volumes"]
    assert any(v.startswith("postgres_data:") for v in db["volumes"])
    assert {"postgres_data", "ollama_data", "caddy_data"} <= set(spec["volumes"])
    assert "healthcheck" in db and "healthcheck" in ollama
    assert app["depends_on"] == {"db": {"condition": "service_healthy"},
                                 "ollama": {"condition": "service_started"}}
    assert app["environment"]["OLLAMA_URL"] == "http://ollama:11434"
    assert app["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@db:5432/" in app["environment"]["DATABASE_URL"]


def test_only_the_proxy_is_published():
    """Issue 9: gunicorn, PostgreSQL and Ollama are reachable from no other machine."""
    services = compose()["services"]
    exposed = {name: [p for p in published(s) if not p[0].startswith("127.")] for name, s in services.items()}
    assert exposed == {"proxy": [("0.0.0.0", "80", "80/tcp")],
                       "proxy-https": [("0.0.0.0", "443", "443/tcp"), ("0.0.0.0", "443", "443/udp")],
                       "app": [], "db": [], "ollama": []}
    assert "ports" not in services["app"] and "ports" not in services["db"]
    assert services["app"]["expose"] == ["8000"]
    # Ollama (no authentication) only on the host's loopback, for `curl localhost:11434`.
    assert published(services["ollama"]) == [("127.0.0.1", "11434", "11434/tcp")]


def test_networks_keep_the_database_inside_and_trust_only_the_proxies():
    spec = compose()
    services, networks = spec["services"], spec["networks"]
    members = {net: {name for name, s in services.items() if net in s.get("networks", [])} for net in networks}
    assert members == {"edge": {"app", "proxy", "proxy-https"}, "data": {"app", "db"}, "llm": {"app", "ollama"}}
    assert networks["data"]["internal"] is True
    assert not (networks["llm"] or {}).get("internal")  # ollama pull needs the internet
    subnet = defaults(networks["edge"]["ipam"]["config"][0]["subnet"])
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", subnet)
    env = services["app"]["environment"]
    assert str(env["TRUSTED_PROXIES"]) == "1"
    assert defaults(env["TRUSTED_PROXY_NETWORKS"]) == subnet
    assert env["TRUSTED_PROXY_NETWORKS"] == networks["edge"]["ipam"]["config"][0]["subnet"]  # one variable


def test_healthchecks_use_readiness_and_the_proxy_waits_for_it():
    services = compose()["services"]
    check = " ".join(services["app"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/ready" in check and "curl" not in check  # python:slim has no curl
    for name in ("proxy", "proxy-https"):
        assert services[name]["depends_on"] == {"app": {"condition": "service_healthy"}}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"HEALTHCHECK .*\n.*http://127\.0\.0\.1:8000/ready", dockerfile)


def test_https_profile():
    services = compose()["services"]
    https, plain = services["proxy-https"], services["proxy"]
    assert https["profiles"] == ["https"] and "profiles" not in plain
    assert "/etc/caddy/Caddyfile.https" in https["command"]
    assert "/etc/caddy/Caddyfile" in plain["command"]
    for service in (https, plain):
        assert "./deploy:/etc/caddy:ro" in service["volumes"]
        assert service["environment"]["DOMAIN"] == "${DOMAIN:-}"
        assert service["image"].startswith("caddy:2.")
    assert "caddy_data:/data" in https["volumes"]  # certificates survive a restart


def caddy_duration(text):
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", text).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def caddy_settings(text):
    """`name value` lines of a Caddyfile, comments dropped (enough for the flat settings asserted)."""
    settings = {}
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if len(words) == 2 and not words[1] == "{":
            settings.setdefault(words[0], []).append(words[1])
    return settings


def test_proxy_config_is_slowloris_proof_and_streams():
    """The shipped Caddy config: header/body deadlines and request buffering, no response buffering,
    upstream timeouts far above the 10 s stream ping. (tests/security/test_proxy.py runs it for real.)"""
    deploy = ROOT / "deploy"
    route = caddy_settings((deploy / "app.caddy").read_text())
    assert route["request_buffers"] == ["1MB"]
    assert "response_buffers" not in route and "buffer_responses" not in route
    assert route["flush_interval"] == ["-1"]  # every write is flushed: text/event-stream token by token
    for name in ("read_timeout", "response_header_timeout"):
        assert caddy_duration(route[name][0]) >= 300  # a stream pings every 10 s; a model may load 300 s
    assert "reverse_proxy app:8000 {" in (deploy / "app.caddy").read_text()
    for caddyfile in ("Caddyfile", "Caddyfile.https"):
        text = (deploy / caddyfile).read_text()
        server = caddy_settings(text)
        assert caddy_duration(server["read_header"][0]) <= 15
        assert caddy_duration(server["read_body"][0]) <= 120
        assert "write" not in server  # no deadline on writing an answer that streams for minutes
        assert "import app.caddy" in text
    plain = (deploy / "Caddyfile").read_text()
    assert "\n:80 {" in plain and "redir @https https://{$DOMAIN}{uri} 308" in plain
    https = (deploy / "Caddyfile.https").read_text()
    assert "\n{$DOMAIN} {" in https and "auto_https disable_redirects" in https


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
    https = subprocess.run(command[:-2] + ["--profile", "https"] + command[-2:], cwd=ROOT,
                           env={**env, "SECRET_KEY": "x" * 40, "DOMAIN": "chat.example.com"},
                           capture_output=True, text=True)
    assert https.returncode == 0, https.stderr
