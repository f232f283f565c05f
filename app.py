"""The Flask app: the HTTP API of SPEC §6, thin over the core job operations in jobs.py.

Views parse the request, call the core and serialise; every error becomes an RFC 9457
problem+json response in one place, and no input reaches SQL except as a bound parameter.
"""
import json
import logging
import re

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

import boot
import cli
import documents
import jobs
import models
from config import ConfigError, fail_fast, settings
from handlers import HandlerError

log = logging.getLogger("conveyor.api")


class ApiError(Exception):
    """A refusal raised by a view: an HTTP status, a title and a detail."""

    def __init__(self, status, title, detail, headers=None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


def problem(status, title, detail, headers=None, **extra):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return Response(json.dumps(body), status=status, headers=headers,
                    mimetype="application/problem+json")


def reply(document, status=200, headers=None):
    return Response(json.dumps(document), status=status, headers=headers,
                    mimetype="application/json")


def json_body():
    """The request body as JSON, or an ApiError that says what is wrong with it."""
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise ApiError(415, "Unsupported media type",
                       f"send JSON with Content-Type: application/json, not {request.mimetype!r}")
    raw = request.get_data(cache=True)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "Bad request", "the body is not valid UTF-8") from None
    except ValueError as exc:
        raise ApiError(400, "Bad request", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "Bad request", "the body is nested too deeply") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def query_int(name, default, minimum, maximum):
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,9}", raw) or not minimum <= int(raw) <= maximum:
        raise jobs.Invalid(f"{name} must be an integer from {minimum} to {maximum}",
                           [f"{name}: {raw!r} is out of range"])
    return int(raw)


def query_name(name):
    raw = request.args.get(name)
    if raw is not None and not re.fullmatch(jobs.NAME_PATTERN, raw):
        raise jobs.Invalid(f"{name} filter {raw!r} is not a valid name", [f"{name}: invalid"])
    return raw


def create_app():
    try:
        boot.start()
    except (ConfigError, HandlerError) as exc:
        fail_fast(exc)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings().max_request_bytes
    app.json.sort_keys = False
    _register_errors(app)
    _register_routes(app)
    cli.register(app)
    return app


def _register_errors(app):
    @app.errorhandler(ApiError)
    def api_error(exc):
        return problem(exc.status, exc.title, exc.detail, exc.headers)

    @app.errorhandler(jobs.JobError)
    def job_error(exc):
        extra = {"errors": exc.errors} if exc.errors else {}
        return problem(exc.status, exc.title, exc.detail, **extra)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        headers = dict(exc.get_response().headers)
        headers.pop("Content-Type", None)
        headers.pop("Content-Length", None)
        return problem(exc.code, exc.name, exc.description, headers)

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
    @app.get("/healthz")
    def healthz():
        try:
            models.db.execute_sql("SELECT 1")
        except models.DB_ERRORS:
            models.reset_connection()
            return problem(503, "Service unavailable", "the database does not answer",
                           {"Retry-After": "1"})
        return reply({"status": "ok"})

    @app.post("/v1/jobs")
    def submit_job():
        key = request.headers.get("Idempotency-Key")
        new = jobs.validate_submission(json_body(), idempotency_key=key)
        [(job, created)] = jobs.enqueue([new])
        return reply(documents.job(job), 201 if created else 200,
                     {"Location": f"/v1/jobs/{job.id}"})

    @app.post("/v1/jobs/batch")
    def submit_batch():
        body = json_body()
        items = body.get("jobs") if isinstance(body, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= jobs.MAX_BATCH:
            raise jobs.Invalid(f"send {{\"jobs\": [...]}} with 1 to {jobs.MAX_BATCH} jobs",
                               ["jobs: must be a list of 1 to 1000 jobs"])
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
        stored = jobs.enqueue(new_jobs)
        created = any(was_created for _, was_created in stored)
        return reply({"items": [documents.job(job) for job, _ in stored]},
                     201 if created else 200)

    @app.get("/v1/jobs/<int:job_id>")
    def show_job(job_id):
        job = jobs.get_job(job_id)
        return reply(documents.job(job, jobs.attempts_of(job.id)))

    @app.get("/v1/jobs")
    def list_jobs():
        page, cursor = jobs.list_jobs(
            status=request.args.get("status"), type=query_name("type"),
            queue=query_name("queue"), limit=query_int("limit", 50, 1, jobs.MAX_LIMIT),
            cursor=request.args.get("cursor"))
        return reply(documents.page([documents.job(job) for job in page], cursor))

    @app.post("/v1/jobs/<int:job_id>/cancel")
    def cancel_job(job_id):
        job, stopped = jobs.cancel(job_id)
        return reply(documents.job(job), 200 if stopped else 202)

    @app.get("/v1/dlq")
    def list_dead():
        page, cursor = jobs.list_jobs(status="dead", limit=query_int("limit", 50, 1, jobs.MAX_LIMIT),
                                      cursor=request.args.get("cursor"))
        return reply(documents.page([documents.job(job) for job in page], cursor))

    @app.post("/v1/dlq/<int:job_id>/retry")
    def retry_dead(job_id):
        return reply(documents.job(jobs.dlq_retry(job_id)))

    @app.delete("/v1/dlq/<int:job_id>")
    def discard_dead(job_id):
        return reply(documents.job(jobs.dlq_discard(job_id)))

    @app.get("/v1/stats")
    def stats():
        return reply(jobs.stats(settings().lease_s))

    @app.get("/v1/workers")
    def workers():
        return reply(documents.page(
            [documents.worker(w) for w in jobs.live_workers(settings().lease_s)], None))


app = create_app()
