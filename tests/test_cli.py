"""flask create-user / set-password, through the real `flask` command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def flask_cli(app, database_url):
    env = {**os.environ, "FLASK_APP": "webapp", "DATABASE_URL": database_url}

    def run(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "flask", *args], cwd=ROOT, env=env, input=stdin,
                              capture_output=True, text=True, timeout=60)
    return run


def test_create_user_from_stdin_then_login(flask_cli, client):
    result = flask_cli("create-user", "Operator", "--admin", stdin="long enough pass\n")
    assert result.returncode == 0, result.stderr
    assert "created user 'operator' (admin)" in result.stdout
    response = client.post("/auth/login", data={"username": "operator", "password": "long enough pass"})
    assert response.status_code == 200


def test_create_user_refuses_existing_and_short(flask_cli):
    assert flask_cli("create-user", "bob", stdin="long enough pass\n").returncode == 0
    again = flask_cli("create-user", "BOB", stdin="another long pass\n")
    assert again.returncode != 0 and "already exists" in again.stderr
    short = flask_cli("create-user", "carol", stdin="short\n")
    assert short.returncode != 0 and "at least 8 characters" in short.stderr
    empty = flask_cli("create-user", "dave", stdin="")
    assert empty.returncode != 0 and "no password" in empty.stderr


def test_set_password(flask_cli, client):
    flask_cli("create-user", "erin", stdin="first password\n")
    result = flask_cli("set-password", "erin", stdin="second password\n")
    assert result.returncode == 0, result.stderr
    assert client.post("/auth/login", data={"username": "erin", "password": "first password"}).status_code == 400
    assert client.post("/auth/login", data={"username": "erin", "password": "second password"}).status_code == 200
    missing = flask_cli("set-password", "nobody", stdin="whatever password\n")
    assert missing.returncode != 0 and "no user named" in missing.stderr


def test_create_user_prompts_twice_without_echo_at_a_terminal(app, database_url):
    """Drive the command through a pseudo-terminal, as an operator would."""
    import pty
    import time
    env = {**os.environ, "FLASK_APP": "webapp", "DATABASE_URL": database_url}
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execvpe(sys.executable, [sys.executable, "-m", "flask", "create-user", "frank"], env)
    output = b""

    def read_until(marker, timeout=30):
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output and time.monotonic() < deadline:
            try:
                output += os.read(fd, 1024)
            except OSError:
                break
    read_until(b"Password:")
    os.write(fd, b"terminal secret\n")
    read_until(b"Repeat for confirmation:")
    os.write(fd, b"terminal secret\n")
    read_until(b"created user")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"created user 'frank'" in output
    assert b"terminal secret" not in output  # never echoed


def test_flask_commands_work_from_the_project_root_without_flask_app(tmp_path):
    """The README prints `flask db upgrade` and `flask create-user`: a plain shell has no FLASK_APP."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "FLASK_APP"}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'plain.db'}"
    flask = [sys.executable, "-m", "flask"]
    root = Path(__file__).resolve().parent.parent
    upgrade = subprocess.run(flask + ["db", "upgrade"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    made = subprocess.run(flask + ["create-user", "root-user", "--admin"], cwd=root, env=env, input="long password 1\n",
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and "created user 'root-user' (admin)" in made.stdout, made.stderr
