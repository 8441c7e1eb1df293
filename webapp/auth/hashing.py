"""Password hashing off the request path: a real thread pool behind a semaphore sized to the cores.

scrypt is deliberately slow (tens of milliseconds of pure CPU). Run inline, a burst of sign-ins
would either block a gevent worker's event loop (every other request of that worker stalls) or, with
threaded workers, put as many hashes on two cores as there are request threads, so each takes
seconds and everything else starves with them. Here a burst queues instead: at most `os.cpu_count()`
hashes run at once per process (the cores divided among WEB_CONCURRENCY workers), in real OS
threads, and the rest wait their turn without holding a database connection (callers must release
theirs first; see accounts.authenticate).

- Under gevent (threading monkey-patched): `gevent.get_hub().threadpool`, real OS threads the hub
  waits on cooperatively; the semaphore is gevent's, so waiting greenlets yield.
- Otherwise: a `concurrent.futures.ThreadPoolExecutor` with one thread per core.

The queue is bounded (PASSWORD_HASH_QUEUE waiting per process; 0 = automatic). With threaded
workers a request waiting for its hash still holds a request thread, so by default at most half of
GUNICORN_THREADS may wait; past that, a sign-in answers 503 with Retry-After at once (and its limit
hit is given back) instead of taking the threads signed-in people need. Under gevent a waiting
request costs a greenlet, so the automatic bound is generous (256). Either way no sign-in waits
longer than PASSWORD_HASH_WAIT seconds (default 10) for its turn: past that it gets the same 503.
"""
import os
import threading

from werkzeug.exceptions import ServiceUnavailable
from werkzeug.security import check_password_hash, generate_password_hash

CORES = max(1, os.cpu_count() or 1)


def _slots():
    """Hashes at once in this process: the cores shared by the machine's workers (WEB_CONCURRENCY),
    at least one. More would only make every hash slower and take CPU from everything else."""
    workers = max(1, int(os.environ.get("WEB_CONCURRENCY") or 1))
    return max(1, CORES // workers)
_state = {}
_state_lock = threading.Lock()


class Busy(ServiceUnavailable):
    """Too many sign-ins are waiting for the password pool: try again in a moment (503)."""
    description = "the server is busy checking other passwords; try again in a few seconds"

    def __init__(self):
        super().__init__(retry_after=2)  # werkzeug writes the Retry-After header


def _max_wait():
    """Seconds a sign-in may wait for a slot before 503 (PASSWORD_HASH_WAIT, default 10)."""
    try:
        from flask import current_app
        return float(current_app.config.get("PASSWORD_HASH_WAIT") or 10)
    except RuntimeError:
        return float(os.environ.get("PASSWORD_HASH_WAIT") or 10)


def _queue_bound(gevent_mode):
    configured = 0
    try:
        from flask import current_app
        configured = int(current_app.config.get("PASSWORD_HASH_QUEUE") or 0)
    except RuntimeError:  # no app context (a script)
        configured = int(os.environ.get("PASSWORD_HASH_QUEUE") or 0)
    if configured > 0:
        return configured
    if gevent_mode:
        return 256
    return max(1, int(os.environ.get("GUNICORN_THREADS") or 32) // 2)


def _under_gevent():
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


def _runner():
    """(semaphore, run(fn, *args)) made on first use, after gunicorn's gevent worker has patched."""
    state = _state.get(os.getpid())
    if state is not None:
        return state
    with _state_lock:
        state = _state.get(os.getpid())
        if state is None:
            gevent_mode = _under_gevent()
            if gevent_mode:
                import gevent
                from gevent.lock import BoundedSemaphore
                semaphore = BoundedSemaphore(_slots())

                def run(fn, *args):
                    return gevent.get_hub().threadpool.apply(fn, args)
            else:
                from concurrent.futures import ThreadPoolExecutor
                semaphore = threading.BoundedSemaphore(_slots())
                executor = ThreadPoolExecutor(max_workers=_slots(), thread_name_prefix="password-hash")

                def run(fn, *args):
                    return executor.submit(fn, *args).result()
            # Keyed by pid: a forked worker must not reuse its parent's pool threads.
            state = _state[os.getpid()] = (semaphore, run, _queue_bound(gevent_mode), [0], threading.Lock())
    return state


def _call(fn, *args):
    semaphore, run, bound, waiting, lock = _runner()
    if not semaphore.acquire(blocking=False):
        with lock:
            if waiting[0] >= bound:
                raise Busy()
            waiting[0] += 1
        try:
            if not semaphore.acquire(timeout=_max_wait()):
                raise Busy()
        finally:
            with lock:
                waiting[0] -= 1
    try:
        return run(fn, *args)
    finally:
        semaphore.release()


def check(password_hash, password):
    """True when `password` matches `password_hash` (werkzeug's format)."""
    return bool(_call(check_password_hash, password_hash, password if isinstance(password, str) else ""))


def generate(password):
    return _call(generate_password_hash, password)


_DUMMY = {}


def dummy_hash():
    """A real hash of nothing, so a missing user costs the same time as a wrong password."""
    if "hash" not in _DUMMY:
        _DUMMY["hash"] = generate("not-a-real-password")
    return _DUMMY["hash"]
