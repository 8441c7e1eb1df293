"""Password hashing off the request path: a real thread pool behind a semaphore sized to the cores.

scrypt is deliberately slow (tens of milliseconds of pure CPU). Run inline, a burst of sign-ins would
either block a gevent worker's event loop (every other request of that worker stalls) or, with
threaded workers, put as many hashes on two cores as there are request threads, so each takes
seconds and everything else starves with them. Here a burst queues instead: at most `os.cpu_count()`
hashes run at once per process, in real OS threads, and the rest wait their turn without holding a
database connection (callers must release theirs first; see passwords.authenticate).

- Under gevent (threading monkey-patched): `gevent.get_hub().threadpool`, real OS threads the hub
  waits on cooperatively; the semaphore is gevent's, so waiting greenlets yield.
- Otherwise: a `concurrent.futures.ThreadPoolExecutor` with one thread per core.
"""
import os
import threading

from werkzeug.security import check_password_hash, generate_password_hash

CORES = max(1, os.cpu_count() or 1)
_state = {}
_state_lock = threading.Lock()


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
            if _under_gevent():
                import gevent
                from gevent.lock import BoundedSemaphore
                semaphore = BoundedSemaphore(CORES)

                def run(fn, *args):
                    return gevent.get_hub().threadpool.apply(fn, args)
            else:
                from concurrent.futures import ThreadPoolExecutor
                semaphore = threading.BoundedSemaphore(CORES)
                executor = ThreadPoolExecutor(max_workers=CORES, thread_name_prefix="password-hash")

                def run(fn, *args):
                    return executor.submit(fn, *args).result()
            # Keyed by pid: a forked worker must not reuse its parent's pool threads.
            state = _state[os.getpid()] = (semaphore, run)
    return state


def _call(fn, *args):
    semaphore, run = _runner()
    with semaphore:
        return run(fn, *args)


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
