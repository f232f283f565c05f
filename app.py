"""The Flask app: the HTTP API of SPEC §6, thin over the core (jobs.py) and the keys (auth.py).

Views parse the request, call the core and serialise. Who may call a view is declared on
it with `@access(...)` (admin-only unless it says otherwise) and enforced by one
before-request hook, which also counts the rate limits (app.RateLimits). Every error
becomes an RFC 9457 problem+json response in one place; no input reaches SQL except as a
bound parameter.
"""
import atexit
import json
import logging
import math
import re
import time
from functools import lru_cache

from flask import Flask, Response, g, request
from jsonschema import Draft202012Validator
from limits import parse_many
from limits.errors import ConfigurationError
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import IntegerConverter

import auth
import boot
import cli
import documents
import handlers
import jobs
import metrics
import models
import openapi
import schedules
from config import ConfigError, fail_fast, settings
from handlers import HandlerError

log = logging.getLogger("conveyor.api")

PUBLIC, SUBMIT, ADMIN = "public", "submit", "admin"
MAX_JSON_DEPTH = 64
MAX_ERROR_CHARS = 500  # one line of a problem's detail or errors; inputs can be huge
_idempotency_key = Draft202012Validator(jobs.SUBMISSION_SCHEMA["properties"]["idempotency_key"])


class ApiError(Exception):
    """A refusal raised by a view or hook: an HTTP status, a title and a detail."""

    def __init__(self, status, title, detail, headers=None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


def problem(status, title, detail, headers=None, errors=None):
    body = {"type": "about:blank", "title": title, "status": status,
            "detail": _clip(detail)}
    if errors:
        body["errors"] = [_clip(error) for error in errors]
    return Response(json.dumps(body), status=status, headers=headers,
                    mimetype="application/problem+json")


def _clip(text):
    text = str(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


# Compact, and without the check for cycles (documents are trees): a batch's 1,000 jobs
# are encoded in half the time.
_document_json = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def reply(document, status=200, headers=None):
    return Response(_document_json.encode(document), status=status, headers=headers,
                    mimetype="application/json")


def no_content():
    """A 204: it has no body, so no Content-Type either."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def access(level):
    """Declare who may call a view: PUBLIC, SUBMIT (submit and admin keys) or ADMIN.
    A view without it is admin-only, so a new route is closed until it says otherwise."""
    def mark(view):
        view.access = level
        return view
    return mark


class JobIdConverter(IntegerConverter):
    """A job id in a path: 1 to 2**63-1; anything else is a 404, never an SQL overflow."""

    def __init__(self, url_map):
        super().__init__(url_map, min=1, max=openapi.MAX_ID)


# ---------------------------------------------------------------------------- parsing

def json_body():
    """The request body as JSON, or an ApiError that says what is wrong with it."""
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise ApiError(415, "Unsupported media type",
                       f"send JSON with Content-Type: application/json, not "
                       f"{request.mimetype or 'no content type'!r}")
    try:
        raw = request.get_data(cache=True)
    except HTTPException:
        raise
    except Exception as exc:  # the server could not read it: bad chunked encoding and such
        raise ApiError(400, "Bad request", f"the body could not be read: {exc}") from None
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except UnicodeDecodeError:
        raise ApiError(400, "Bad request", "the body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "Bad request", "the body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "Bad request", f"the body is not valid JSON: {exc}") from None
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise ApiError(400, "Bad request",
                       f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _deeper_than(value, limit):
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:  # of containers only: a batch holds many more values than containers
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def idempotency_key_header():
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _idempotency_key.is_valid(key):
        raise jobs.InvalidRequest("the Idempotency-Key header must be 1 to 255 printable "
                                  "ASCII characters", ["Idempotency-Key: invalid"])
    return key


def query(*allowed):
    """Refuse query parameters a route does not take (a typo must not widen a filter)."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise jobs.InvalidRequest(f"unknown query parameter {unknown[0]!r}",
                                  [f"{name}: not a parameter of this route (it takes "
                                   f"{', '.join(allowed) or 'none'})" for name in unknown])
    return request.args


def query_int(name, default, minimum, maximum):
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not minimum <= int(raw) <= maximum:
        raise jobs.InvalidRequest(f"{name} must be an integer from {minimum} to {maximum}",
                                  [f"{name}: {raw!r} is out of range"])
    return int(raw)


def query_name(name):
    raw = request.args.get(name)
    if raw is not None and not re.fullmatch(jobs.NAME_PATTERN, raw):
        raise jobs.InvalidRequest(f"{name} filter {raw!r} is not a valid name",
                                  [f"{name}: invalid"])
    return raw


def page_args():
    return {"limit": query_int("limit", 50, 1, jobs.MAX_LIMIT),
            "cursor": request.args.get("cursor")}


def batch_of(body):
    """The validated jobs of a batch body; 422 naming every bad index, none stored."""
    if not isinstance(body, dict) or set(body) != {"jobs"}:
        raise jobs.Invalid('send {"jobs": [...]} and nothing else',
                           ["(batch): must be an object with only a jobs list"])
    items = body["jobs"]
    if not isinstance(items, list) or not 1 <= len(items) <= jobs.MAX_BATCH:
        raise jobs.Invalid(f"jobs must be a list of 1 to {jobs.MAX_BATCH} jobs",
                           [f"jobs: must be a list of 1 to {jobs.MAX_BATCH} jobs"])
    new_jobs, errors = [], []
    for index, item in enumerate(items):
        try:
            new_jobs.append(jobs.validate_submission(item))
        except jobs.Invalid as exc:
            errors.extend(f"{index}: {error}" for error in exc.errors or [exc.detail])
        except jobs.TooLarge as exc:
            raise jobs.TooLarge(f"job {index}: {exc.detail}") from None
    if errors:
        raise jobs.Invalid("some jobs are not valid; none was stored", errors)
    return new_jobs


def schedule_page(schedule):
    """A schedule as its own page shows it: with its next run times and recent runs."""
    return documents.schedule(schedule, schedules.upcoming(schedule),
                              schedules.recent_runs(schedule.name))


def owner():
    """Whose jobs the current key may see: None (all) for an admin key, else its own."""
    return None if g.api_key.role == "admin" else g.api_key.id


# ---------------------------------------------------------------------------- the app

def create_app():
    try:
        boot.start()
    except (ConfigError, HandlerError) as exc:
        fail_fast(exc)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings().max_request_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.url_map.converters["job_id"] = JobIdConverter
    try:
        storage = storage_from_string(settings().ratelimit_storage_uri)
    except ConfigurationError as exc:
        fail_fast(ConfigError(f"RATELIMIT_STORAGE_URI {settings().ratelimit_storage_uri!r} "
                              f"is not usable: {exc}"))
    _register_errors(app)
    _register_access(app, FixedWindowRateLimiter(storage))
    _register_routes(app)
    cli.register(app)
    # Counts reach the database from a thread in each gunicorn worker (gunicorn.conf.py)
    # and at exit, which is when a `flask` command's are stored.
    atexit.register(metrics.flush_quietly)
    return app


class RateLimits:
    """The two limits of SPEC §6, counted with a fixed window in RATELIMIT_STORAGE_URI by
    flask-limiter's storage layer (the `limits` package):
    - RATE_LIMIT per API key (a key's own rate limit overrides it), over every route;
    - AUTH_FAIL_LIMIT failed authentications per client address: 401 until the limit is
      reached, then 429 for every request with a key from that address until the window
      ends, so that a correct guess cannot get through either.
    The access hook applies them itself: flask-limiter's request hooks, which resolve and
    evaluate limits in general, cost more than the rest of a submission (bench/RESULTS.md).
    A storage that cannot be reached lets requests through, with a warning."""

    KEY, FAILED_AUTH = "key", "auth-fail"
    WARN_EVERY_S = 10

    def __init__(self, strategy, failed_auth_limit):
        self.strategy = strategy
        self.failed_auth = parse_many(failed_auth_limit)
        self.parsed = lru_cache(maxsize=256)(parse_many)
        self.warned_at = -math.inf

    def check_failed_auth(self, address):
        for item in self.failed_auth:
            if not self._counted(self.strategy.test, item, self.FAILED_AUTH, address):
                self._refuse(item, self.FAILED_AUTH, address, "failed_authentication",
                             f"too many failed authentications from {address} (limit {item})")

    def record_failed_auth(self, address):
        for item in self.failed_auth:
            self._counted(self.strategy.hit, item, self.FAILED_AUTH, address)

    def hit_key(self, key):
        """Count one request of this key: the X-RateLimit-* headers for its response, or
        ApiError 429 once it is over its limit."""
        identity = key.key_hash[:32]  # unique across deployments sharing a storage
        tightest = None  # (remaining, item, stats) of the limit closest to refusing
        for item in self.parsed(key.rate_limit or settings().rate_limit):
            if not self._counted(self.strategy.hit, item, self.KEY, identity):
                self._refuse(item, self.KEY, identity, "api_key",
                             f"this API key is over its rate limit of {item}")
            stats = self._counted(self.strategy.get_window_stats, item, self.KEY, identity)
            if stats is not True and (tightest is None or stats.remaining < tightest[0]):
                tightest = (stats.remaining, item, stats)
        return {} if tightest is None else self._headers(*tightest[1:])

    def _refuse(self, item, scope, identity, name, detail):
        metrics.count("conveyor_rate_limited", limit=name)
        stats = self.strategy.get_window_stats(item, scope, identity)
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        raise ApiError(429, "Too many requests", f"{detail}; retry in {wait}s",
                       {**self._headers(item, stats), "Retry-After": str(wait)})

    @staticmethod
    def _headers(item, stats):
        return {"X-RateLimit-Limit": str(item.amount),
                "X-RateLimit-Remaining": str(stats.remaining),
                "X-RateLimit-Reset": str(int(stats.reset_time))}

    def _counted(self, call, *args):
        """call(*args) on the storage; True (let it through) when the storage fails."""
        try:
            return call(*args)
        except Exception as exc:
            now = time.monotonic()
            if now - self.warned_at >= self.WARN_EVERY_S:
                self.warned_at = now
                log.warning("rate limit storage unavailable, requests go unlimited: %s", exc)
            return True


def presented_key():
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, if any."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def _register_access(app, strategy):
    limits = RateLimits(strategy, settings().auth_fail_limit)

    @app.before_request
    def authorize():
        if request.routing_exception is not None:
            return  # a 404 or 405 says so, key or not
        level = getattr(app.view_functions[request.endpoint], "access", ADMIN)
        if level == PUBLIC:
            return
        address = request.remote_addr or "unknown"
        limits.check_failed_auth(address)
        secret = presented_key()
        key = auth.verify(secret) if secret else None
        if key is None:
            limits.record_failed_auth(address)
            detail = ("the API key is unknown or revoked" if secret else
                      "send an API key: Authorization: Bearer <key>, or X-API-Key: <key>")
            raise ApiError(401, "Unauthorized", detail,
                           {"WWW-Authenticate": 'Bearer realm="conveyor"'})
        g.api_key = key
        if level == ADMIN and key.role != "admin":
            raise ApiError(403, "Forbidden", f"{request.method} {request.path} needs an "
                                             f"admin key; {key.name!r} is a submit key")
        g.rate_limit_headers = limits.hit_key(key)

    @app.after_request
    def rate_limit_headers(response):
        response.headers.update(g.get("rate_limit_headers", ()))
        return response


def _register_errors(app):
    @app.errorhandler(ApiError)
    def api_error(exc):
        return problem(exc.status, exc.title, exc.detail, exc.headers)

    @app.errorhandler(jobs.JobError)
    def job_error(exc):
        return problem(exc.status, exc.title, exc.detail, errors=exc.errors)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        headers = dict(exc.get_response().headers)
        headers.pop("Content-Type", None)
        headers.pop("Content-Length", None)
        detail = exc.description
        if isinstance(exc, MethodNotAllowed):
            detail = (f"{request.method} is not allowed on {request.path}; it takes "
                      f"{', '.join(m for m in exc.valid_methods if m != 'HEAD')}")
        elif isinstance(exc, NotFound):
            detail = f"there is no {request.path}; /openapi.json lists every route"
        return problem(exc.code, exc.name, detail, headers)

    @app.errorhandler(RecursionError)
    def too_deep(exc):
        return problem(400, "Bad request", "the request is nested too deeply to process")

    def database_error(exc):
        log.warning("database unavailable: %s", str(exc).strip()[:200])
        models.reset_connection()
        return problem(503, "Service unavailable", "the database is unavailable; try again",
                       {"Retry-After": "1"})

    for error_class in models.DB_ERRORS:
        app.register_error_handler(error_class, database_error)

    @app.errorhandler(Exception)
    def unexpected(exc):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem(500, "Internal server error", "an unexpected error occurred")


def _register_routes(app):
    conf = settings()
    description = json.dumps(openapi.document(handlers.registered(),
                                              metrics_public=conf.metrics_public))
    collectors = metrics.registry(conf.lease_s)

    @app.get("/healthz")
    @access(PUBLIC)
    def healthz():
        try:
            models.db.execute_sql("SELECT 1")
        except models.DB_ERRORS:
            models.reset_connection()
            return problem(503, "Service unavailable", "the database does not answer",
                           {"Retry-After": "1"})
        return reply({"status": "ok"})

    @app.get("/openapi.json")
    @access(PUBLIC)
    def openapi_document():
        return Response(description, mimetype="application/json")

    @app.get("/metrics")
    @access(PUBLIC if conf.metrics_public else ADMIN)
    def prometheus_metrics():
        return Response(metrics.exposition(collectors), content_type=metrics.CONTENT_TYPE)

    @app.post("/v1/jobs")
    @access(SUBMIT)
    def submit_job():
        body, key = json_body(), idempotency_key_header()
        if key is not None and isinstance(body, dict) and body.get("idempotency_key", key) != key:
            raise jobs.InvalidRequest("the Idempotency-Key header and idempotency_key differ",
                                      ["idempotency_key: differs from the Idempotency-Key "
                                       "header"])
        try:
            [(job, created)] = jobs.enqueue([jobs.validate_submission(body, idempotency_key=key)],
                                            api_key_id=g.api_key.id)
        except jobs.Conflict as exc:  # the core numbers each conflict by its index in a batch
            raise jobs.Conflict(exc.detail,
                                [error.removeprefix("0: ") for error in exc.errors]) from None
        return reply(documents.job(job), 201 if created else 200,
                     {"Location": f"/v1/jobs/{job.id}"})

    @app.post("/v1/jobs/batch")
    @access(SUBMIT)
    def submit_batch():
        stored = jobs.enqueue(batch_of(json_body()), api_key_id=g.api_key.id)
        created = any(was_created for _, was_created in stored)
        return reply({"items": [documents.job(job) for job, _ in stored]},
                     201 if created else 200)

    @app.get("/v1/jobs/<job_id:job_id>")
    @access(SUBMIT)
    def show_job(job_id):
        job = jobs.get_job(job_id, api_key_id=owner())
        return reply(documents.job(job, jobs.attempts_of(job.id)))

    @app.get("/v1/jobs")
    @access(SUBMIT)
    def list_jobs():
        args = query("status", "type", "queue", "limit", "cursor")
        page, cursor = jobs.list_jobs(status=args.get("status"), type=query_name("type"),
                                      queue=query_name("queue"), api_key_id=owner(),
                                      **page_args())
        return reply(documents.page([documents.job(job) for job in page], cursor))

    @app.post("/v1/jobs/<job_id:job_id>/cancel")
    @access(SUBMIT)
    def cancel_job(job_id):
        job, stopped = jobs.cancel(job_id, api_key_id=owner())
        return reply(documents.job(job), 200 if stopped else 202)

    @app.get("/v1/dlq")
    def list_dead():
        query("type", "queue", "limit", "cursor")
        page, cursor = jobs.list_jobs(status="dead", type=query_name("type"),
                                      queue=query_name("queue"), **page_args())
        return reply(documents.page([documents.job(job) for job in page], cursor))

    @app.post("/v1/dlq/<job_id:job_id>/retry")
    def retry_dead(job_id):
        return reply(documents.job(jobs.dlq_retry(job_id)))

    @app.delete("/v1/dlq/<job_id:job_id>")
    def discard_dead(job_id):
        return reply(documents.job(jobs.dlq_discard(job_id)))

    @app.get("/v1/schedules")
    def list_schedules():
        query("limit", "cursor")
        page, cursor = schedules.list_schedules(**page_args())
        return reply(documents.page([documents.schedule(s) for s in page], cursor))

    @app.post("/v1/schedules")
    def create_schedule():
        schedule = schedules.create(json_body())
        return reply(schedule_page(schedule), 201, {"Location": f"/v1/schedules/{schedule.name}"})

    @app.get("/v1/schedules/<name>")
    def show_schedule(name):
        return reply(schedule_page(schedules.get(name)))

    @app.patch("/v1/schedules/<name>")
    def change_schedule(name):
        return reply(schedule_page(schedules.update(name, json_body())))

    @app.delete("/v1/schedules/<name>")
    def delete_schedule(name):
        schedules.remove(name)
        return no_content()

    @app.get("/v1/stats")
    def stats():
        return reply(jobs.stats(conf.lease_s))

    @app.get("/v1/workers")
    def workers():
        return reply(documents.page(
            [documents.worker(w) for w in jobs.live_workers(conf.lease_s)], None))


app = create_app()
