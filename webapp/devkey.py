"""The secret key of a development server started without SECRET_KEY (FLASK_DEBUG=1).

Never a fixed, published value: a random key made once per server start and shared by all of its
workers (each worker is its own process, and a session cookie or token signed by one must verify in
the others), kept in instance/dev-secret-key (mode 0600). The file holds "<start tag> <key>"; the
start tag is set by gunicorn's master when it reads webapp/gunicorn_conf.py (WEBAPP_SERVER_START,
inherited by every worker), or is the reloader's (`flask run`) or this process's id otherwise. A
worker that finds another start's tag makes a new key: a restart signs everyone out, as it should
for a throw-away key. The check-and-create runs under an exclusive lock, and the file is created
with O_EXCL, so two workers booting at once agree on one key.
"""
import fcntl
import logging
import os
import secrets

FILE_NAME = "dev-secret-key"
START_TAG = "WEBAPP_SERVER_START"


def start_tag():
    tag = os.environ.get(START_TAG)
    if tag:
        return tag
    # `flask run` with the reloader: the serving process is the reloader's child.
    return f"pid-{os.getppid() if os.environ.get('WERKZEUG_RUN_MAIN') else os.getpid()}"


def development_key(instance_dir):
    """This server start's random key (made now if this is the start's first worker)."""
    key = _shared_key(instance_dir)
    logging.getLogger("webapp").warning(
        "FLASK_DEBUG without SECRET_KEY: using a random development key made for this server start "
        "(%s); sessions and tokens end when the server restarts. Set SECRET_KEY in production.",
        instance_dir / FILE_NAME)
    return key


def _shared_key(instance_dir):
    instance_dir.mkdir(parents=True, exist_ok=True)
    path = instance_dir / FILE_NAME
    tag = start_tag()
    with open(instance_dir / (FILE_NAME + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = _read(path)
            if current and current[0] == tag:
                return current[1]
            key = secrets.token_hex(32)
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(f"{tag} {key}\n")
            return key
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path):
    try:
        words = path.read_text().split()
    except FileNotFoundError:
        return None
    return words if len(words) == 2 else None
