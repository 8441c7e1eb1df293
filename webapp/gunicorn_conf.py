"""gunicorn settings (used by the Dockerfile and `make run`): threaded workers, because each
streaming answer holds one request thread while it waits on the model, but no database connection."""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
timeout = 60            # worker heartbeat, not request length: long streams are fine with gthread
graceful_timeout = 30
keepalive = 5
accesslog = None        # the app writes its own access line, with the request id and user
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def worker_exit(server, worker):
    """A worker leaving (deploy, restart, max requests) saves its running answers as 'interrupted'."""
    app = getattr(worker, "wsgi", None)
    registry = getattr(app, "extensions", {}).get("generations") if app is not None else None
    if registry is not None:
        registry.shutdown()


def post_worker_init(worker):
    """Each worker sweeps for answers orphaned by a crashed worker or replica (see generation.py)."""
    from webapp.generation import start_orphan_sweeper
    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "config"):
        start_orphan_sweeper(app)
