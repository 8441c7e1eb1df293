"""gunicorn settings (Dockerfile, `make run`, the tests): gevent workers.

An open stream costs a greenlet, not an OS thread: a worker holds thousands of them (waiting on the
model, on a slow client, on the database), and the app's background threads (generations, their
watchdog, the orphan sweeper) become greenlets too, because the worker monkey-patches `threading`.

Load this file by its path (`gunicorn -c webapp/gunicorn_conf.py 'webapp:create_app()'`), not as
`python:webapp.gunicorn_conf`: importing it as a module would import the `webapp` package (Flask,
SQLAlchemy, …) in the master, before any worker has patched `socket`, `select` and `threading`.
Loaded by path, this file imports nothing of the app; each worker patches first (gunicorn's gevent
worker does it in init_process) and only then loads the app, so psycopg sees the patched `select`
at import and waits cooperatively (psycopg >= 3.1.14), and requests/urllib3 use gevent sockets.
Keep `preload_app` off for the same reason.
"""
import os
import time

# One tag per server start, inherited by every worker: a debug server without SECRET_KEY shares one
# random key among its workers and makes a new one on the next start (webapp/devkey.py).
os.environ["WEBAPP_SERVER_START"] = f"{os.getpid()}-{time.time_ns()}"

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
# Connections (open streams included) one worker serves at once; past that it stops accepting and
# the kernel queues them. Each costs a greenlet and a socket, no thread and no database connection.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "2000"))
preload_app = False     # see above: the app must be imported after the worker's monkey-patching
timeout = 60            # worker heartbeat (the event loop must turn at least this often), not request length
graceful_timeout = 30
keepalive = 5           # also bounds how long a request's headers may take to arrive (slow clients)
accesslog = None        # the app writes its own access line, with the request id and user
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn itself would take X-Forwarded-Proto: https from any peer in forwarded_allow_ips (loopback by
# default) and mark the request HTTPS. The app decides that alone (webapp/https.py: TRUSTED_PROXIES
# from TRUSTED_PROXY_NETWORKS), so gunicorn believes no scheme header from anyone.
secure_scheme_headers = {}


def _app(worker):
    app = getattr(worker, "wsgi", None)
    return app if app is not None and hasattr(app, "config") else None


def worker_exit(server, worker):
    """A worker leaving (deploy, restart, max requests) saves its running answers as 'interrupted'."""
    app = _app(worker)
    if app is not None:
        from webapp.generation import generations
        generations.shutdown(app)


def post_worker_init(worker):
    """Each worker sweeps for answers orphaned by a crashed worker or replica (see answers.py),
    listens for tokens pushed from other workers (see push.py), sends each response's head with its
    body (see gunicorn_response.py), leaves the loaded app out of garbage collection, and says
    whether its waits are cooperative."""
    import gc

    from webapp import gunicorn_response
    from webapp.capacity import describe_worker
    gunicorn_response.install()  # a response's head leaves with its first body bytes
    app = _app(worker)
    if app is not None:
        from webapp.generation import generations
        generations.start_orphan_sweeper(app)
        from webapp import push
        push.start(app)  # PostgreSQL: this worker's one listening connection for pushed tokens
    # The loaded app (modules, SQLAlchemy's metadata, templates: ~140,000 objects) lives as long as
    # the worker. Frozen, a full collection no longer walks it: in a burst of 1,000 streams, each
    # worker's collections took 0.3-0.5 s of CPU, one of them stopping every stream for 0.17 s;
    # frozen, 0.2 s in all and at most 0.06 s (bench/README.md, eleventh pass).
    gc.freeze()
    worker.log.info(f"{describe_worker()}; {gc.get_freeze_count()} objects of the loaded app frozen")
