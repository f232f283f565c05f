"""gunicorn settings for the Procfile's `web` (read from this folder automatically).

One process with threads keeps the default in-memory rate limits exact; the app is
loaded once, before forking, so bad configuration stops gunicorn with one line.
"""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
threads = int(os.environ.get("WEB_THREADS", "8"))
preload_app = True
accesslog = None
# gunicorn's control socket lives at one path per user: a second web process on the host
# would take it over. Nothing here uses it.
control_socket_disable = True


def post_worker_init(worker):
    """Each worker stores its metrics counts from a background thread (see metrics.py)."""
    import metrics
    from config import settings
    metrics.flush_in_background(settings().heartbeat_s)


def on_starting(server):
    """Migrate the schema before any worker serves (the app, preloaded, does not), and say
    in one line which database and job types web uses."""
    import boot
    boot.ready("web")
