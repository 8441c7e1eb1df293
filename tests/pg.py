"""A real PostgreSQL for the suite: TEST_DATABASE_URL when given, else a throwaway server.

The throwaway server is a fresh cluster (initdb) in a temporary directory, started with the
installed PostgreSQL binaries on a free port and removed at the end. PostgreSQL refuses to run as
root, so as root it runs as the `postgres` system user.
"""
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import psycopg


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name):
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found if isinstance(found, str) else found[-1]


class ThrowawayPostgres:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="llm-test-pg-")
        self.port = _free_port()
        self.prefix = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def start(self):
        data = os.path.join(self.dir, "data")
        subprocess.run(self.prefix + [_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                                      "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run(self.prefix + [_bin("pg_ctl"), "-D", data, "-w", "-l", os.path.join(self.dir, "log"),
                                      "-o", f"-p {self.port} -k {self.dir} -h 127.0.0.1 -F", "start"],
                       check=True, capture_output=True)
        self.data = data
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self):
        subprocess.run(self.prefix + [_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _plain(url):
    return url.replace("postgresql+psycopg://", "postgresql://")


class TestDatabase:
    """A database of its own for this test run, created on a server and dropped afterwards."""

    def __init__(self, base=None):
        self.server = None
        base = base or os.environ.get("TEST_DATABASE_URL")
        if not base:
            self.server = ThrowawayPostgres()
            base = self.server.start()
        self.base = base
        self.admin_url = _plain(base)
        self.name = f"llm_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        head, _, _ = base.rpartition("/")
        self.url = head.replace("postgresql://", "postgresql+psycopg://") + "/" + self.name

    def another(self):
        """One more empty database on the same server (dropped on its own; the server stays)."""
        return TestDatabase(self.base)

    def drop(self):
        for _ in range(5):
            try:
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                break
            except psycopg.Error:
                time.sleep(0.5)
        if self.server:
            self.server.stop()
