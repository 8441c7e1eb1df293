"""The README's fenced blocks, the rule they follow, and the shell scripts that run them.

The rule (tests/test_readme.py holds the README to it):
- every fence names its language, so no command can hide in a bare ``` fence;
- `sh` and `python` blocks run, unless tagged `no-run` (```sh no-run: Docker, `make run`, the whole
  suite); where they run follows from their `##` section: "Operating it" runs its `flask` commands from
  the project root against an empty database, every other section runs in one bash session, in
  document order (later blocks use the `$TOKEN` and `$API_KEY` of earlier ones), against the app;
- `text`, `json` and `http` are shown, never run; any other language (```bash, ```console) or tag is
  a problem, so a block is either run or visibly excused.
A `curl` whose line ends in a comment starting with a status (`# 204`, `# 400 …`) must get that status;
every other curl must get a 2xx.
"""
import os
import re
import time
from dataclasses import dataclass

RUN = {"sh", "python"}
NOT_CODE = {"text", "json", "http"}
NO_RUN = "no-run"
OPERATOR_SECTIONS = {"Operating it"}
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
STATUS_COMMENT = re.compile(r"\s#\s*([1-5]\d\d)\b[^'\"]*$")  # `… # 204` at the end of a command


@dataclass(frozen=True)
class Block:
    line: int  # the opening fence's line, 1-based
    lang: str
    tags: tuple
    section: str  # the `#`/`##` heading above it
    heading: str  # the nearest heading of any level
    text: str

    @property
    def runs(self):
        return self.lang in RUN and NO_RUN not in self.tags

    @property
    def session(self):
        return "operator" if self.section in OPERATOR_SECTIONS else "api"

    @property
    def label(self):
        return f"README.md:{self.line} ({self.heading})"


def parse(markdown):
    """Every fenced block with its language, tags and headings; an unclosed fence is an error."""
    blocks, section, heading = [], "", ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            found = HEADING.match(lines[i])
            if found:
                heading = found.group(2)
                section = heading if len(found.group(1)) <= 2 else section
            i += 1
            continue
        marker, info = fence.group(1), fence.group(2).split()
        closing = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: the fence is never closed")
        blocks.append(Block(i + 1, info[0] if info else "", tuple(info[1:]), section, heading,
                            "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def problems(blocks):
    """What breaks the rule: blocks that would be neither run nor visibly excused."""
    found = []
    for block in blocks:
        if not block.lang:
            found.append(f"{block.label}: the fence names no language (```sh, ```sh no-run, ```text …)")
        elif block.lang not in RUN | NOT_CODE:
            found.append(f"{block.label}: ```{block.lang} is neither run nor known to be text: "
                         f"use ```sh (run by tests/test_readme.py), ```sh no-run, or ```text")
        for tag in block.tags:
            if tag != NO_RUN or block.lang not in RUN:
                found.append(f"{block.label}: unknown tag {tag!r} on ```{block.lang} (only sh/python take no-run)")
    return found


def with_expected_statuses(text):
    """`EXPECT_STATUS=NNN curl …` for each command whose last line ends in `# NNN …`."""
    lines, out, command = text.splitlines(), [], []
    for line in lines:
        command.append(line)
        if line.rstrip().endswith("\\"):
            continue
        status = STATUS_COMMENT.search(line)
        if status:
            joined = "\n".join(command)
            if not re.search(r"\bcurl\b", joined):
                raise ValueError(f"a status comment on a command with no curl: {joined!r}")
            joined = re.sub(r"\bcurl\b", f"EXPECT_STATUS={status.group(1)} curl", joined, count=1)
            command = joined.split("\n")
        out.extend(command)
        command = []
    out.extend(command)
    return "\n".join(out) + "\n"


# Every curl reports what it got on stderr (`@@http <status> <expected> <method> <url>`); -q: no ~/.curlrc.
PREAMBLE = """set -euo pipefail
curl() {
  command curl -q --write-out "%{stderr}@@http %{http_code} ${EXPECT_STATUS:-2xx} %{method} %{url_effective}\\n" "$@"
}
"""


def script(blocks, workdir, replace=lambda text: text, python_replace=lambda text: text):
    """One bash script running the blocks in order, each between `@@start`/`@@done` markers on stderr.
    Python blocks become files in workdir, run with $README_PYTHON."""
    parts = [PREAMBLE]
    for block in blocks:
        parts.append(f"echo '@@start {block.line}' >&2\n")
        if block.lang == "sh":
            parts.append(with_expected_statuses(replace(block.text)))
        else:
            path = os.path.join(workdir, f"readme_{block.line}.py")
            with open(path, "w") as file:
                file.write(python_replace(block.text))
            parts.append(f'"$README_PYTHON" {path}\n')
        parts.append(f"echo '@@done {block.line}' >&2\n")
    return "".join(parts)


def finished(output):
    """The blocks (by line) whose every command ran: their `@@done` marker was printed."""
    return {int(line) for line in re.findall(r"@@done (\d+)", output)}


def wrong_statuses(output):
    """The curls whose status was not the expected one (a 2xx unless a `# NNN` comment said otherwise),
    each named by the README line of its block."""
    wrong, block = [], "?"
    for marker in re.finditer(r"@@start (\d+)|@@http (\d{3}) (\S+) (\S+) (\S+)", output):
        start, status, expected, method, url = marker.groups()
        if start:
            block = start
            continue
        ok = 200 <= int(status) < 300 if expected == "2xx" else status == expected
        if not ok:
            wrong.append(f"README.md:{block}: {method} {url}: {status}, expected {expected}")
    return wrong


def run_in_terminal(argv, env, cwd, answers, timeout):
    """Run argv on a pseudo-terminal (so `flask create-user` asks as it would ask a person) and type
    `answers[prompt]` at each prompt. Returns (exit code, everything printed)."""
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal's session leader
        os.chdir(cwd)
        os.execvpe(argv[0], argv, env)
    output, answered, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            for prompt, reply in answers.items():
                at = output.find(prompt.encode(), answered)
                if at >= 0:
                    answered = at + len(prompt)
                    os.write(fd, reply.encode() + b"\n")
        else:
            os.killpg(pid, 9)  # bash and the flask command it waits on: the session it leads
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace").replace("\r\n", "\n")
