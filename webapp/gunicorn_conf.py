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
    """Each worker sweeps for answers orphaned by a crashed worker or replica (see answers.py)."""
    app = _app(worker)
    if app is not None:
        from webapp.generation import generations
        generations.start_orphan_sweeper(app)
