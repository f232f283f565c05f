"""The Flask app: the HTTP API, thin over the core (jobs.py) and the keys (auth.py).

Views parse the request, call the core and serialise. Who may call a view is declared on
it with `@access(...)` (admin-only unless it says otherwise) and enforced by one
before-request hook, which also counts the rate limits (app.RateLimits). Every error
becomes an RFC 9457 problem+json response in one place; no input reaches SQL except as a
bound parameter.
"""
import atexit
import ctypes
import ipaddress
import json
import logging
import math
import re
import time
from functools import lru_cache

import orjson
from flask import Flask, Response, after_this_request, g, request
from jsonschema import Draft202012Validator
from limits import parse_many
from limits.errors import StorageError
from limits.storage import MemoryStorage as LimitsMemoryStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound as NoSuchRoute
from werkzeug.routing import IntegerConverter

from core import keys
from infra import boot
from cli import commands
from core import documents
import handlers
from core import jobs
from core import callbacks
from core import history
from core import submission
from core import workers as registry
from infra import metrics
import models
from web import openapi
from core import queues
from core import schedules
from core import selection
from infra.config import ConfigError, fail_fast, settings
from core.errors import (Conflict, Invalid, InvalidJob, InvalidKey, InvalidRequest,
                         InvalidSchedule, InvalidSetting, NotFound, Refused, TooLarge)
from handlers import HandlerError
from web import exposition
from core import status as statuses

log = logging.getLogger("conveyor.api")

PUBLIC, SUBMIT, ADMIN = "public", "submit", "admin"
MAX_JSON_DEPTH = 64
MAX_ERROR_CHARS = 500  # one line of a problem's detail or errors; inputs can be huge
READ_STEP = 64 * 1024  # a request body is read in steps of this many bytes
SEND_STEP = 64 * 1024  # a batch's answer is sent in steps of about this many bytes
RELEASE_AFTER_BYTES = 1024 * 1024  # a body this large gives its memory back afterwards
# glibc's malloc_trim (None with another C library): see _release_memory_once_sent.
_libc = ctypes.CDLL(None)
_malloc_trim = getattr(_libc, "malloc_trim", None)
# glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), so
# after one large body every later one is carved from the heap, where it fragments and
# stays; fixed at its default, blocks of 128 KiB and more are mapped and unmapped whole.
if hasattr(_libc, "mallopt"):
    _libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
_idempotency_key = Draft202012Validator(submission.SUBMISSION_SCHEMA["properties"]["idempotency_key"])


class ApiError(Exception):
    """A refusal raised by a view or hook: an HTTP status, a title and a detail."""

    def __init__(self, status, title, detail, headers=None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


# The one table from the core's refusals (core/errors.py) to HTTP: the status and title each
# answers with. Every class a caller may raise has its row (tests/test_errors.py checks).
PROBLEMS = {
    InvalidJob: (422, "Invalid job"),
    InvalidRequest: (422, "Invalid request"),
    InvalidSchedule: (422, "Invalid schedule"),
    InvalidKey: (422, "Invalid key"),
    InvalidSetting: (422, "Invalid setting"),
    NotFound: (404, "Not found"),
    Conflict: (409, "Conflict"),
    TooLarge: (413, "Payload too large"),
}


def problem(status, title, detail, headers=None, errors=None, **extensions):
    """An RFC 9457 problem response; extensions are its extra members."""
    body = {"type": "about:blank", "title": title, "status": status,
            "detail": _clip(detail), **extensions}
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


def _encoded(document):
    """document as JSON bytes: by orjson, several times faster than _document_json, unless
    it holds what orjson does not write (an integer beyond 64 bits, a lone surrogate; a
    payload read by _json_decoder can), which _document_json does."""
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return _document_json.encode(document).encode()


def _items_as_sent(stored, found_callbacks):
    """A batch's answer, {"items": [job, ...]}, encoded a job at a time while it is sent:
    it is as large as the batch, and is never held whole. The server writes each part
    yielded with a call of its own, so jobs go out SEND_STEP bytes at a time."""
    part, size = [b'{"items":['], 0
    for index, (job, _) in enumerate(stored):
        encoded = _encoded(documents.job(job, callback=found_callbacks.get(job.id)))
        part.append(b"," + encoded if index else encoded)
        size += len(encoded)
        if size >= SEND_STEP:
            yield b"".join(part)
            part, size = [], 0
    part.append(b"]}")
    yield b"".join(part)


def job_document(job, attempts=None):
    """A job as the API shows it, with its callback when it has one."""
    return documents.job(job, attempts, callbacks.of_job(job.id) if job.has_callback else None)


def job_documents(rows):
    """Jobs as the API lists them, each with its callback (one query for them all)."""
    found = callbacks.of_jobs([job.id for job in rows if job.has_callback])
    return [documents.job(job, callback=found.get(job.id)) for job in rows]


def no_content():
    """A 204: it has no body, so no Content-Type either."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def access(level, monitoring=False):
    """Declare who may call a view: PUBLIC, SUBMIT (submit and admin keys) or ADMIN.
    A view without it is admin-only, so a new route is closed until it says otherwise.
    A monitoring view is served even while the rate-limit storage is unreachable, whatever
    RATE_LIMIT_ON_STORAGE_ERROR says, so that it can report the outage."""
    def mark(view):
        view.access, view.monitoring = level, monitoring
        return view
    return mark


# An id as SPEC §6 spells it: ASCII digits, no leading zero (werkzeug's \d+ also takes
# Arabic-Indic or fullwidth digits, and /v1/jobs/007 would name job 7).
ID_PATTERN = "[1-9][0-9]*"


class JobIdConverter(IntegerConverter):
    """A job id in a path: 1 to 2**63-1 spelt ID_PATTERN; anything else is a 404, never an
    SQL overflow."""
    regex = ID_PATTERN

    def __init__(self, url_map):
        super().__init__(url_map, min=1, max=openapi.MAX_ID)


# ---------------------------------------------------------------------------- parsing

def json_body():
    """The request body as JSON, or an ApiError that says what is wrong with it.

    A batch body can be MAX_REQUEST_BYTES: it is read once into one buffer, decoded, and
    each copy let go as soon as the next exists (the request keeps none), so that the peak
    stays near the bytes, the text and the parsed values of one body (bench/web_memory.py).
    """
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise ApiError(415, "Unsupported media type",
                       f"send JSON with Content-Type: application/json, not "
                       f"{request.mimetype or 'no content type'!r}")
    raw = request_body()
    body = _read_fast(raw)
    if body is _UNREAD:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "Bad request", "the body is not valid UTF-8") from None
        del raw
        try:
            body = _json_decoder.decode(text)
        except RecursionError:
            raise ApiError(400, "Bad request", "the body is nested too deeply") from None
        except ValueError as exc:
            raise ApiError(400, "Bad request", f"the body is not valid JSON: {exc}") from None
        finally:
            del text
    else:
        del raw
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise ApiError(400, "Bad request",
                       f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def request_body():
    """The body's bytes (a bytearray), or 413 when it is over MAX_REQUEST_BYTES however it
    is sent. Werkzeug's own limit stops reading a chunked body (no Content-Length) at the
    limit without saying so, which took a body cut short for the whole."""
    limit = settings().max_request_bytes
    if (request.content_length or 0) > limit:
        raise _too_large(limit)
    # gunicorn ends wsgi.input where the body ends, with Content-Length or chunked, and says
    # so (wsgi.input_terminated); werkzeug's request.stream ends it elsewhere (tests).
    environ = request.environ
    stream = environ["wsgi.input"] if environ.get("wsgi.input_terminated") else request.stream
    body = bytearray()
    try:
        while chunk := stream.read(min(READ_STEP, limit + 1 - len(body))):
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except (ApiError, HTTPException):
        raise
    except Exception as exc:  # the server could not read it: bad chunked encoding and such
        raise ApiError(400, "Bad request", f"the body could not be read: {exc}") from None
    finally:
        if len(body) >= RELEASE_AFTER_BYTES and _malloc_trim is not None:
            after_this_request(_release_memory_once_sent)
    return body


def _release_memory_once_sent(response):
    """Once the answer to a large body is sent, give the memory it took back to the OS:
    eight batches at once left the process at a gigabyte for good (bench/web_memory.py).
    The thread's database connection is closed (libpq keeps a buffer as large as the
    largest statement it sent until then), and glibc asked to return what its threads'
    arenas freed."""
    def release():
        models.reset_connection()
        _malloc_trim(0)
    response.call_on_close(release)
    return response


def _too_large(limit):
    return ApiError(413, "Payload too large",
                    f"the body is over MAX_REQUEST_BYTES ({limit} bytes)")


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)

# orjson reads a body several times faster than _json_decoder, straight from its bytes (no
# copy as text), and reads every JSON text it accepts as _json_decoder does (floats
# correctly rounded, NaN, Infinity and numbers out of range refused), but one: an integer
# beyond 64 bits becomes a float. So a body with 19 digits in a row, or one orjson refuses,
# is read by _json_decoder, whose value or error is the answer.
_UNREAD = object()
_DIGITS_AS_ZEROS = bytes(ord("0") if ord("0") <= byte <= ord("9") else ord(" ")
                         for byte in range(256))
_LONG_DIGITS = b"0" * 19


def _read_fast(raw):
    """raw read by orjson, or _UNREAD when _json_decoder must read it."""
    if _has_long_digits(raw):
        return _UNREAD
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _UNREAD


def _has_long_digits(raw):
    """Whether raw holds len(_LONG_DIGITS) digits in a row: each digit made "0" and anything
    else " " (a regular expression took longer than orjson's parse), READ_STEP bytes at a
    time, so that a large body is not copied whole."""
    overlap = len(_LONG_DIGITS) - 1  # a run across two steps is in the second
    return any(_LONG_DIGITS in raw[start:start + READ_STEP + overlap].translate(_DIGITS_AS_ZEROS)
               for start in range(0, len(raw), READ_STEP))


def _deeper_than(value, limit):
    """Whether a parsed body nests containers more than `limit` deep. A level at a time:
    a batch holds thousands of containers, and many more values than containers. (json and
    orjson make dicts and lists, never a subclass.)"""
    level = [value] if value.__class__ is dict or value.__class__ is list else []
    for _ in range(limit):
        deeper = []
        for item in level:
            for child in item.values() if item.__class__ is dict else item:
                if child.__class__ is dict or child.__class__ is list:
                    deeper.append(child)
        level = deeper
    return bool(level)


def idempotency_key_header():
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _idempotency_key.is_valid(key):
        raise InvalidRequest("the Idempotency-Key header must be 1 to 255 printable "
                             "ASCII characters", ["Idempotency-Key: invalid"])
    return key


def query(*allowed):
    """Refuse query parameters a route does not take (a typo must not widen a filter)."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise InvalidRequest(f"unknown query parameter {unknown[0]!r}",
                             [f"{name}: not a parameter of this route (it takes "
                              f"{', '.join(allowed) or 'none'})" for name in unknown])
    return request.args


def query_int(name, default, minimum, maximum):
    """An integer query parameter, written as an id is (ASCII digits, no leading zero)."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (len(raw) <= len(str(maximum)) and re.fullmatch(f"0|{ID_PATTERN}", raw)
            and minimum <= int(raw) <= maximum):
        raise InvalidRequest(f"{name} must be an integer from {minimum} to {maximum}",
                             [f"{name}: {raw!r} is not such an integer"])
    return int(raw)


def query_name(name):
    raw = request.args.get(name)
    if raw is not None and not re.fullmatch(submission.NAME_PATTERN, raw):
        raise InvalidRequest(f"{name} filter {raw!r} is not a valid name",
                             [f"{name}: invalid"])
    return raw


def page_args():
    return {"limit": query_int("limit", 50, 1, history.MAX_LIMIT),
            "cursor": request.args.get("cursor")}


def batch_of(body, rules):
    """The validated jobs of a batch body; 422 naming every bad index, none stored."""
    if not isinstance(body, dict) or set(body) != {"jobs"}:
        raise InvalidJob('send {"jobs": [...]} and nothing else',
                         ["(batch): must be an object with only a jobs list"])
    items = body["jobs"]
    if not isinstance(items, list) or not 1 <= len(items) <= submission.MAX_BATCH:
        raise InvalidJob(f"jobs must be a list of 1 to {submission.MAX_BATCH} jobs",
                         [f"jobs: must be a list of 1 to {submission.MAX_BATCH} jobs"])
    new_jobs, errors = [], []
    for index, item in enumerate(items):
        try:
            new_jobs.append(submission.validate_submission(item, rules))
        except Invalid as exc:
            errors.extend(f"{index}: {error}" for error in exc.errors or [exc.detail])
        except TooLarge as exc:
            raise TooLarge(f"job {index}: {exc.detail}") from None
    if errors:
        raise InvalidJob("some jobs are not valid; none was stored", errors)
    return new_jobs


def selection_body():
    """The filters a bulk route was sent (core.selection): its JSON body, or {} (every job
    the route applies to) when nothing at all was sent. Filters in the query string are
    refused, not ignored: ignoring one would act on every job."""
    query()
    sent = (request.content_length or request.mimetype
            or "chunked" in request.headers.get("Transfer-Encoding", "").lower())
    return selection.read(json_body() if sent else {})


def schedule_page(schedule):
    """A schedule as its own page shows it: with its next run times and recent runs."""
    return documents.schedule(schedule, schedules.upcoming(schedule),
                              schedules.recent_runs(schedule.name))


def owner():
    """Whose jobs the current key may see: None (all) for an admin key, else its own."""
    return None if g.api_key.role == "admin" else g.api_key.id


# ---------------------------------------------------------------------------- the app

def create_app():
    """The app, built without I/O (boot.prepare): a bad setting or handler stops the
    process with one line, but nothing connects, so importing this module opens no
    connection. Whoever serves it checks the database and its schema first (boot.connect and
    boot.ready): web in gunicorn.conf.py's on_starting, the `flask` commands as they run."""
    try:
        conf = boot.prepare()
    except (ConfigError, HandlerError) as exc:
        fail_fast(exc)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = conf.max_request_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.url_map.converters["job_id"] = JobIdConverter
    # No redirects: werkzeug answers /v1//jobs with a 308 to an absolute URL built from the
    # Host header, which a forged Host turns into a redirect to another site.
    app.url_map.merge_slashes = False
    rate_limits = RateLimits(conf)
    _register_errors(app)
    _register_access(app, rate_limits)
    _register_routes(app, rate_limits)
    commands.register(app)
    # Counts reach the database from a thread in each gunicorn worker (gunicorn.conf.py)
    # and at exit, which is when a `flask` command's are stored.
    atexit.register(metrics.flush_quietly)
    return app


class MemoryStorage(LimitsMemoryStorage):
    """limits' memory storage (memory://, the default) without its expiry timer, which
    it starts, a threading.Timer of 10 ms, at every count that finds the last one ended:
    below 100 requests a second, a new thread in the way of each response (bench/RESULTS.md).
    A window that ended reads as ended either way (get); the windows that ended are
    dropped here at most once every sweep_every_s, by the count that comes then."""

    sweep_every_s = 1.0

    def __init__(self, uri=None, wrap_exceptions=False, **options):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.swept_at = time.time()

    def incr(self, key, expiry, amount=1):
        now = time.time()
        if now - self.swept_at >= self.sweep_every_s:
            self.swept_at = now
            self._sweep(now)
        self.get(key)
        with self.locks[key]:
            self.storage[key] += amount
            if self.storage[key] == amount:
                self.expirations[key] = now + expiry
        return self.storage.get(key, 0)

    def _sweep(self, now):
        for key, ends in list(self.expirations.items()):
            if ends <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                self.locks.pop(key, None)


class RateLimits:
    """The two limits of SPEC §6, counted with a fixed window in RATELIMIT_STORAGE_URI (or
    REDIS_URL) by flask-limiter's storage layer (the `limits` package):
    - RATE_LIMIT per API key (a key's own rate limit overrides it), over every route;
    - AUTH_FAIL_LIMIT failed authentications per client address: 401 until the limit is
      reached, then 429 until the window ends. Only requests without a valid key are
      counted or refused there, so one client's failures never lock out a valid key.
    The access hook applies them itself: flask-limiter's request hooks, which resolve and
    evaluate limits in general, cost more than the rest of a submission (bench/RESULTS.md).
    When the storage cannot be reached, RATE_LIMIT_ON_STORAGE_ERROR decides (SPEC §13):
    `closed` refuses the request with 503, `open` lets it through uncounted. Each request
    tries the storage again, so limits hold again as soon as it answers."""

    KEY, FAILED_AUTH = "key", "auth-fail"
    WARN_EVERY_S = 10
    RETRY_AFTER_S = 5
    TIMEOUT_S = 1  # a Redis that does not answer must not hold requests for minutes

    def __init__(self, conf):
        uri = conf.ratelimit_storage_uri
        options = {"socket_timeout": self.TIMEOUT_S, "socket_connect_timeout": self.TIMEOUT_S}
        self.storage = MemoryStorage(uri) if uri.startswith("memory://") else \
            storage_from_string(uri, wrap_exceptions=True, **(
                options if uri.startswith(("redis://", "rediss://")) else {}))
        self.strategy = FixedWindowRateLimiter(self.storage)
        self.failed_auth_limits = parse_many(conf.auth_fail_limit)
        self.parsed = lru_cache(maxsize=256)(parse_many)
        self.windows = lru_cache(maxsize=4096)(self._windows)
        self.on_storage_error = conf.rate_limit_on_storage_error
        self.reachable = True
        self.warned_at = -math.inf

    def storage_state(self):
        """Whether the storage answers now, and the policy while it does not (/healthz)."""
        return {"ok": self.storage.check(), "on_error": self.on_storage_error}

    def failed_auth(self, address):
        """Count one failed authentication from address; ApiError 429 once it is over
        AUTH_FAIL_LIMIT (the caller answers 401 below it)."""
        self._counted(self._hit_failed_auth, address)

    def hit_key(self, key, monitoring=False):
        """Count one request of this key: the X-RateLimit-* headers for its response, or
        ApiError 429 once it is over its limit."""
        return self._counted(self._hit_key, key, monitoring=monitoring) or {}

    def _hit_failed_auth(self, address):
        for item in self.failed_auth_limits:
            if not self.strategy.hit(item, self.FAILED_AUTH, address):
                self._refuse(item, self.FAILED_AUTH, address, "failed_authentication",
                             f"too many failed authentications from {address} (limit {item})")

    def _hit_key(self, key):
        """The fixed window of FixedWindowRateLimiter.hit, counted in the storage itself:
        the count its increment answers is this request's, so the headers need no second
        read of it (one storage call less per limit: a round trip each on Redis), and the
        reset time is read for the tightest limit only."""
        identity = key.key_hash[:32]  # unique across deployments sharing a storage
        tightest = None  # (remaining, item, window) of the limit closest to refusing
        for item, window in self.windows(key.rate_limit or settings().rate_limit, identity):
            count = self.storage.incr(window, item.get_expiry())
            if count > item.amount:
                self._refuse(item, self.KEY, identity, "api_key",
                             f"this API key is over its rate limit of {item}")
            if tightest is None or item.amount - count < tightest[0]:
                tightest = (item.amount - count, item, window)
        remaining, item, window = tightest
        return {"X-RateLimit-Limit": str(item.amount), "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(int(self.storage.get_expiry(window)))}

    def _windows(self, limits, identity):
        """[(item, the storage key of its window for identity)] of a key's limits: what
        FixedWindowRateLimiter counts under, worked out once per key, not per request."""
        return [(item, item.key_for(self.KEY, identity)) for item in self.parsed(limits)]

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

    def _counted(self, count, *args, monitoring=False):
        """count(*args) against the storage; when the storage fails, ApiError 503 under
        the `closed` policy (unless monitoring), else None: the request goes uncounted."""
        try:
            result = count(*args)
        except StorageError as exc:
            refused = self.on_storage_error == "closed" and not monitoring
            self._storage_failed(exc.storage_error, refused)
            if refused:
                raise ApiError(503, "Service unavailable",
                               "the rate-limit storage is unreachable; try again",
                               {"Retry-After": str(self.RETRY_AFTER_S)}) from None
            return None
        if not self.reachable:
            self.reachable = True
            log.info("rate limit storage reachable again: requests are counted")
        return result

    def _storage_failed(self, error, refused):
        self.reachable = False
        metrics.count("conveyor_rate_limit_storage_errors",
                      outcome="refused" if refused else "let_through")
        now = time.monotonic()
        if now - self.warned_at >= self.WARN_EVERY_S:
            self.warned_at = now
            log.warning("rate limit storage unreachable (RATE_LIMIT_ON_STORAGE_ERROR=%s), "
                        "requests are %s: %s", self.on_storage_error,
                        "refused with 503" if self.on_storage_error == "closed"
                        else "let through uncounted", error)


def client_address(trusted):
    """Who sent the request, for the failed-authentication limit (SPEC §6): the direct
    peer, unless it is one of TRUSTED_PROXIES. Then X-Forwarded-For is read from the right
    (each proxy appends the address it was called from), skipping trusted hops: the first
    untrusted one is the client. What is left of it, a client may have written itself."""
    address = request.remote_addr or "unknown"
    forwarded = ",".join(request.headers.getlist("X-Forwarded-For")).split(",")
    for hop in reversed([hop.strip() for hop in forwarded if hop.strip()]):
        if not _trusted(address, trusted):
            break
        address = hop
    return address


def _trusted(address, networks):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:10.0.0.1 is 10.0.0.1
    return any(ip in network for network in networks)


def presented_key():
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, if any."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def _register_access(app, rate_limits):
    trusted = settings().trusted_proxies

    @app.before_request
    def authorize():
        if request.routing_exception is not None:
            return  # a 404 or 405 says so, key or not
        view = app.view_functions[request.endpoint]
        level = getattr(view, "access", ADMIN)
        if level == PUBLIC:
            return
        secret = presented_key()
        key = keys.verify(secret) if secret else None
        if key is None:
            rate_limits.failed_auth(client_address(trusted))
            detail = ("the API key is unknown or revoked" if secret else
                      "send an API key: Authorization: Bearer <key>, or X-API-Key: <key>")
            raise ApiError(401, "Unauthorized", detail,
                           {"WWW-Authenticate": 'Bearer realm="conveyor"'})
        g.api_key = key
        if level == ADMIN and key.role != "admin":
            raise ApiError(403, "Forbidden", f"{request.method} {request.path} needs an "
                                             f"admin key; {key.name!r} is a submit key")
        g.rate_limit_headers = rate_limits.hit_key(key, getattr(view, "monitoring", False))

    @app.after_request
    def rate_limit_headers(response):
        response.headers.update(g.get("rate_limit_headers", ()))
        return response


def _register_errors(app):
    @app.errorhandler(ApiError)
    def api_error(exc):
        return problem(exc.status, exc.title, exc.detail, exc.headers)

    @app.errorhandler(Refused)
    def refused(exc):
        status, title = PROBLEMS[type(exc)]
        return problem(status, title, exc.detail, errors=exc.errors)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        headers = dict(exc.get_response().headers)
        headers.pop("Content-Type", None)
        headers.pop("Content-Length", None)
        detail = exc.description
        if isinstance(exc, MethodNotAllowed):
            detail = (f"{request.method} is not allowed on {request.path}; it takes "
                      f"{', '.join(m for m in exc.valid_methods if m != 'HEAD')}")
        elif isinstance(exc, NoSuchRoute):
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


def _register_routes(app, rate_limits):
    conf = settings()
    rules = submission.Rules.from_settings(conf)
    description = json.dumps(openapi.document(handlers.registered(),
                                              metrics_public=conf.metrics_public))
    collectors = exposition.registry(conf.lease_s, rate_limits.storage.check)

    @app.get("/healthz")
    @access(PUBLIC)
    def healthz():
        try:
            models.db.execute_sql("SELECT 1")
        except models.DB_ERRORS:
            models.reset_connection()
            return problem(503, "Service unavailable", "the database does not answer",
                           {"Retry-After": "1"})
        storage = rate_limits.storage_state()
        if not storage["ok"] and storage["on_error"] == "closed":
            return problem(503, "Service unavailable",
                           "the rate-limit storage is unreachable, so requests with a key "
                           "are refused (RATE_LIMIT_ON_STORAGE_ERROR=closed)",
                           {"Retry-After": str(RateLimits.RETRY_AFTER_S)},
                           rate_limit_storage=storage)
        return reply({"status": "ok", "rate_limit_storage": storage})

    @app.get("/openapi.json")
    @access(PUBLIC)
    def openapi_document():
        return Response(description, mimetype="application/json")

    @app.get("/v1/me")
    @access(SUBMIT)
    def me():
        query()
        return reply(documents.me(g.api_key, conf.rate_limit))

    @app.get("/metrics")
    @access(PUBLIC if conf.metrics_public else ADMIN, monitoring=True)
    def prometheus_metrics():
        return Response(exposition.text(collectors), content_type=exposition.CONTENT_TYPE)

    @app.post("/v1/jobs")
    @access(SUBMIT)
    def submit_job():
        body, key = json_body(), idempotency_key_header()
        if key is not None and isinstance(body, dict) and body.get("idempotency_key", key) != key:
            raise InvalidRequest("the Idempotency-Key header and idempotency_key differ",
                                 ["idempotency_key: differs from the Idempotency-Key "
                                  "header"])
        try:
            [(job, created)] = jobs.enqueue(
                [submission.validate_submission(body, rules, idempotency_key=key)],
                api_key_id=g.api_key.id)
        except Conflict as exc:  # the core numbers each conflict by its index in a batch
            raise Conflict(exc.detail,
                           [error.removeprefix("0: ") for error in exc.errors]) from None
        document = job_document(job)
        return reply(document, 201 if created else 200, {"Location": f"/v1/jobs/{job.id}"})

    @app.post("/v1/jobs/batch")
    @access(SUBMIT)
    def submit_batch():
        new_jobs = batch_of(json_body(), rules)
        stored = jobs.enqueue(new_jobs, api_key_id=g.api_key.id)
        created = any(was_created for _, was_created in stored)
        found = callbacks.of_jobs([job.id for job, _ in stored if job.has_callback])
        return Response(_items_as_sent(stored, found), 201 if created else 200,
                        mimetype="application/json")

    @app.get("/v1/jobs/<job_id:job_id>")
    @access(SUBMIT)
    def show_job(job_id):
        job = history.get_job(job_id, api_key_id=owner())
        return reply(job_document(job, history.attempts_of(job.id)))

    @app.get("/v1/jobs")
    @access(SUBMIT)
    def list_jobs():
        args = query("status", "type", "queue", "parent_id", "limit", "cursor")
        page, cursor = history.list_jobs(status=args.get("status"), type=query_name("type"),
                                      queue=query_name("queue"), api_key_id=owner(),
                                      parent_id=query_int("parent_id", None, 1, openapi.MAX_ID),
                                      **page_args())
        return reply(documents.page(job_documents(page), cursor))

    @app.post("/v1/jobs/<job_id:job_id>/cancel")
    @access(SUBMIT)
    def cancel_job(job_id):
        job, stopped = jobs.cancel(job_id, api_key_id=owner())
        return reply(job_document(job), 200 if stopped else 202)

    @app.post("/v1/jobs/cancel")
    def cancel_matching_jobs():
        return reply({"count": jobs.cancel_all(selection_body())})

    @app.get("/v1/dlq")
    def list_dead():
        query("type", "queue", "limit", "cursor")
        page, cursor = history.list_jobs(status=statuses.DEAD, type=query_name("type"),
                                      queue=query_name("queue"), **page_args())
        return reply(documents.page(job_documents(page), cursor))

    @app.post("/v1/dlq/retry")
    def retry_matching_dead():
        return reply({"count": jobs.dlq_retry_all(selection_body())})

    @app.post("/v1/dlq/<job_id:job_id>/retry")
    def retry_dead(job_id):
        return reply(job_document(jobs.dlq_retry(job_id)))

    @app.delete("/v1/dlq/<job_id:job_id>")
    def discard_dead(job_id):
        return reply(job_document(jobs.dlq_discard(job_id)))

    @app.get("/v1/schedules")
    def list_schedules():
        query("limit", "cursor")
        page, cursor = schedules.list_schedules(**page_args())
        return reply(documents.page([documents.schedule(s) for s in page], cursor))

    @app.post("/v1/schedules")
    def create_schedule():
        schedule = schedules.create(json_body(), rules)
        return reply(schedule_page(schedule), 201, {"Location": f"/v1/schedules/{schedule.name}"})

    @app.get("/v1/schedules/<name>")
    def show_schedule(name):
        return reply(schedule_page(schedules.get(name)))

    @app.patch("/v1/schedules/<name>")
    def change_schedule(name):
        return reply(schedule_page(schedules.update(name, json_body(), rules)))

    @app.delete("/v1/schedules/<name>")
    def delete_schedule(name):
        schedules.remove(name)
        return no_content()

    @app.get("/v1/queues")
    def list_queues():
        query()
        return reply(documents.page([documents.queue(q) for q in queues.list_queues()], None))

    @app.patch("/v1/queues/<name>")
    def change_queue(name):
        return reply(documents.queue(queues.update_queue(name, json_body())))

    @app.get("/v1/stats")
    def stats():
        return reply(history.stats(conf.lease_s))

    @app.get("/v1/workers")
    def workers():
        return reply(documents.page(
            [documents.worker(w) for w in registry.live_workers(conf.lease_s)], None))


app = create_app()
