"""The README is executable: its `sh` and `python` blocks run as printed, with the host and a fresh
account put in, against the app under gunicorn (tests/live.py) and `flask` from the project root.

The rule and the runner are in tests/readme_blocks.py: every fence names its language; `sh`/`python`
blocks run unless tagged `no-run`; "Operating it" runs against an empty PostgreSQL database under a
terminal (its `flask create-user` asks for the password, and this test types it); every other section
runs in one bash session in document order, with `curl` held to a 2xx (or the status a `# NNN` comment
names) and Python with this venv's interpreter (the `openai` example). A block that did not finish, a
block the plan left out, or a curl with another status fails the test.
"""
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_user
from readme_blocks import (
    NO_RUN,
    finished,
    parse,
    problems,
    run_in_terminal,
    script,
    with_expected_statuses,
    wrong_statuses,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOST = "http://localhost:8000"  # how the README names the app
ACCOUNT = ("alice", "s3cret-pass")  # and the account its examples sign in with
KEY_PLACEHOLDER = '"llmk_…"'  # the key in the Python example; the sh blocks before it make $API_KEY
LONG_REPLY = " ".join(f"word{n}" for n in range(60))  # past the `Last-Event-ID: 118` the README resumes from
TIMEOUT = 50


def readme_blocks():
    return parse(README.read_text())


def shell_env(**extra):
    """This venv first on PATH (`flask`, `python3`), loopback only: no proxies, no FLASK_APP (.flaskenv)."""
    env = {k: v for k, v in os.environ.items()
           if k != "FLASK_APP" and not k.lower().endswith("_proxy") and k != "DATABASE_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return {**env, **extra}


def report(output, blocks):
    """Which block stopped, and the last of what it printed."""
    started = re.findall(r"@@start (\d+)", output)
    last = next((b for b in blocks if started and b.line == int(started[-1])), None)
    where = f"stopped in {last.label}:\n{last.text}" if last else "stopped before the first block"
    return f"{where}\n--- output (end) ---\n{output[-4000:]}"


def check_run(code, output, blocks):
    assert code == 0, report(output, blocks)
    assert finished(output) == {b.line for b in blocks}, report(output, blocks)  # none left out
    assert not wrong_statuses(output), "\n".join(wrong_statuses(output)) + f"\n--- output (end) ---\n{output[-4000:]}"


# ---- the rule -------------------------------------------------------------------------------------

def test_every_readme_block_is_run_or_visibly_excused():
    blocks = readme_blocks()
    assert not problems(blocks), "\n".join(problems(blocks))
    running = [b for b in blocks if b.runs]
    # The sections a reader copies from are run: operators', the JSON API's and the OpenAI clients'.
    assert {b.section for b in running} >= {"Operating it", "The JSON API", "Use it from any OpenAI client"}
    assert any(b.lang == "python" and "from openai import OpenAI" in b.text for b in running)
    excused = [b for b in blocks if NO_RUN in b.tags]
    for block in excused:  # excused, yet still shell that parses
        assert block.lang == "sh", block.label
        assert subprocess.run(["bash", "-n"], input=block.text, text=True).returncode == 0, block.label


SAMPLE = """# Title
## Operating it
```sh
flask db upgrade
```
### Docker Compose
```sh no-run
docker compose up -d
```
## The JSON API
```sh
curl -s http://localhost:8000/health
```
```text
event: start
```
"""


@pytest.mark.parametrize("fence, complaint", [
    ("```", "names no language"),
    ("```bash", "```bash is neither run nor known"),
    ("```sh norun", "unknown tag 'norun'"),
    ("```text no-run", "unknown tag 'no-run' on ```text"),
])
def test_the_rule_flags_blocks_that_would_slip_past(fence, complaint):
    assert problems(parse(SAMPLE)) == []
    blocks = parse(SAMPLE + f"## Later\n{fence}\nrm -rf build\n```\n")
    found = problems(blocks)
    assert len(found) == 1 and complaint in found[0] and "README.md:18 (Later)" in found[0], found


def test_the_plan_sorts_blocks_by_section_and_tag():
    blocks = parse(SAMPLE)
    assert [(b.line, b.lang, b.runs, b.session, b.heading) for b in blocks] == [
        (3, "sh", True, "operator", "Operating it"),
        (7, "sh", False, "operator", "Docker Compose"),
        (11, "sh", True, "api", "The JSON API"),
        (14, "text", False, "api", "The JSON API"),
    ]
    with pytest.raises(ValueError, match="never closed"):
        parse("## A\n```sh\necho open\n")


def test_a_skipped_or_broken_block_fails_the_run(tmp_path):
    """The runner's own checks can fail: a block that exits early leaves the next one unfinished, a
    failing command stops the session, and a curl's wrong status is caught."""
    blocks = parse("## S\n```sh\necho one\n```\n```sh\nexit 0\n```\n```sh\necho never\n```\n"
                   "```sh\nfalse\n```\n")
    run = subprocess.run(["bash", "-c", script(blocks, tmp_path)], capture_output=True, text=True, timeout=10)
    assert finished(run.stderr) == {2}  # `exit 0` skipped the rest: check_run would name them
    with pytest.raises(AssertionError):
        check_run(run.returncode, run.stderr, blocks)
    failing = parse("## S\n```sh\nfalse\necho after\n```\n")
    run = subprocess.run(["bash", "-c", script(failing, tmp_path)], capture_output=True, text=True, timeout=10)
    assert run.returncode != 0 and finished(run.stderr) == set()
    assert wrong_statuses("@@start 3\n@@http 404 2xx GET http://x/a\n@@http 204 204 DELETE http://x/b\n"
                          "@@start 9\n@@http 200 400 POST http://x/c\n") == [
        "README.md:3: GET http://x/a: 404, expected 2xx", "README.md:9: POST http://x/c: 200, expected 400"]


def test_status_comments_become_expectations():
    text = ('curl -s -X DELETE http://h/keys/$ID -H "A: b"   # 204\n'
            "curl -s http://h/x \\\n  -d a=b   # 400: wrong password\n"
            "X=$(curl -s http://h/y)  # the list\n")
    assert with_expected_statuses(text) == (
        'EXPECT_STATUS=204 curl -s -X DELETE http://h/keys/$ID -H "A: b"   # 204\n'
        "EXPECT_STATUS=400 curl -s http://h/x \\\n  -d a=b   # 400: wrong password\n"
        "X=$(curl -s http://h/y)  # the list\n")
    with pytest.raises(ValueError, match="no curl"):
        with_expected_statuses("echo hi   # 200\n")


# ---- the README itself ----------------------------------------------------------------------------

def test_the_operator_commands_run_as_printed_from_the_project_root(empty_pg_url, tmp_path):
    """`flask db upgrade`, `flask create-user` (at a terminal and from a pipe), … on an empty
    PostgreSQL database, from the project root, with only .flaskenv naming the app."""
    blocks = [b for b in readme_blocks() if b.runs and b.session == "operator"]
    assert blocks and all(b.lang == "sh" for b in blocks)
    path = tmp_path / "operator.sh"
    path.write_text(script(blocks, tmp_path).replace("set -euo pipefail\n", "set -euo pipefail\nexec 2>&1\n", 1))
    env = shell_env(DATABASE_URL=empty_pg_url, OLLAMA_URL="http://127.0.0.1:9", TERM="dumb")
    password = "typed at the terminal"
    code, output = run_in_terminal(["bash", str(path)], env, ROOT,
                                   {"Password: ": password, "Repeat for confirmation: ": password}, TIMEOUT)
    check_run(code, output, blocks)
    assert password not in output  # asked without echo
    assert "created user" in output


def test_the_api_and_client_examples_run_as_printed(servers, app, ollama, tmp_path):
    blocks = [b for b in readme_blocks() if b.runs and b.session == "api"]
    assert blocks
    server = servers(workers=2)
    username, password = f"reader-{secrets.token_hex(4)}", secrets.token_hex(12)
    make_user(app, username, password)
    ollama.script(reply=LONG_REPLY)

    def replace(text):
        text = text.replace(HOST, server.url).replace(ACCOUNT[1], password)
        return re.sub(rf"\b{ACCOUNT[0]}\b", username, text)

    def python_replace(text):
        return replace(text).replace(KEY_PLACEHOLDER, '__import__("os").environ["API_KEY"]')

    path = tmp_path / "api.sh"
    body = script(blocks, tmp_path, replace, python_replace)
    # The Python example gets the key the sh blocks made (a reader pastes theirs).
    body = body.replace('"$README_PYTHON"', 'API_KEY="${API_KEY:-}" "$README_PYTHON"')
    path.write_text(body)
    run = subprocess.run(["bash", str(path)], cwd=tmp_path, env=shell_env(README_PYTHON=sys.executable),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    check_run(run.returncode, run.stdout + "\n" + run.stderr, blocks)
    assert "@@http" in run.stderr
    # The re-attach with `Last-Event-ID: 118` went on right after that character: the streamed texts
    # are the whole answer once, then its rest from 118 on.
    texts = "".join(re.findall(r'^data: \{"text":\s*"([^"]*)"\}', run.stdout, re.M))
    assert texts == LONG_REPLY + LONG_REPLY[118:], run.stdout[-3000:]
