"""gunicorn settings for the Procfile's `web` (read from this folder automatically).

One process with threads keeps the default in-memory rate limits exact; the app is
loaded once, before forking, so bad configuration stops gunicorn with one line.
"""
import json
import os

from gunicorn import util

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
    from infra import metrics
    from infra.config import settings
    metrics.flush_in_background(settings().heartbeat_s)


def on_starting(server):
    """Web's start-up, before any worker serves (the app, preloaded, connected to nothing):
    configure logging, check the database answers and is migrated (else stop with one
    line: migrating is the release phase's, `flask db upgrade`) and say in one line which
    database and job types web uses."""
    from infra import boot
    from infra.config import ConfigError, fail_fast, settings
    try:
        boot.connect(settings())
        boot.ready("web")
    except ConfigError as exc:
        fail_fast(exc)


def write_problem(sock, status_int, reason, mesg):
    """What gunicorn answers itself, before the app sees a request (a request line or
    headers too long, a malformed request): problem+json like every other error of the
    API, in place of gunicorn's HTML page. Its workers send these through
    gunicorn.util.write_error, with this signature; nothing else calls it."""
    body = json.dumps({"type": "about:blank", "title": reason, "status": status_int,
                       "detail": mesg[:500]}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = write_problem
