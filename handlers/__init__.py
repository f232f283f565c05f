"""The handler API: `@handler` registers a job type; `Permanent` and `RetryAfter` steer retries;
`outbound_session()` makes HTTP requests to URLs from payloads (see handlers/outbound.py).

A job type is one module in this folder or in a folder named in HANDLER_PATHS; `load`
imports them all (errors.py, outbound.py and rates.py, the rest of the handler API, register
none).
Handlers get the payload and a `Context`, and know nothing of the database: `ctx.step` is
backed by whatever the worker hands the context.
"""
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from handlers.errors import Permanent, RetryAfter
from handlers.rates import Rate, parse_rate
from handlers.outbound import OutboundRefused, outbound_session

__all__ = ["handler", "Permanent", "RetryAfter", "Context", "Handler", "HandlerError",
           "load", "get", "registered", "outbound_session", "OutboundRefused"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class HandlerError(Exception):
    """A handler module or registration is unusable; the process must not start."""


@dataclass(frozen=True)
class Handler:
    name: str
    fn: Callable[[Any, "Context"], Any]
    queue: Optional[str] = None
    max_attempts: Optional[int] = None
    timeout_s: Optional[float] = None
    backoff_base_s: Optional[float] = None
    backoff_max_s: Optional[float] = None
    schema: Optional[dict] = None
    concurrency: Optional[int] = None  # running attempts of this type, across every host
    rate: Optional[Rate] = None  # attempts of this type started in any interval
    group_concurrency: Optional[int] = None  # running attempts per (type, group)

    @property
    def limited(self):
        """Whether a claim must check this type's limits."""
        return (self.concurrency, self.rate, self.group_concurrency) != (None, None, None)

    @property
    def origin(self):
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @cached_property
    def _validator(self):
        return None if self.schema is None else Draft202012Validator(self.schema)

    def payload_errors(self, payload):
        """Messages for each way payload breaks the handler's schema (none when it fits)."""
        validator = self._validator
        if validator is None or validator.is_valid(payload):
            return []
        return [_describe(error) for error in validator.iter_errors(payload)]


def _describe(error):
    where = "".join(f"/{part}" for part in error.absolute_path)
    return f"payload{where}: {error.message}"


class Context:
    """What a handler knows of its job: identity, attempt, a logger, `step` and `progress`."""

    def __init__(self, *, job_id, attempt, max_attempts, queue, idempotency_key, timeout_s,
                 step, progress, enqueue=None):
        self.job_id = job_id
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.queue = queue
        self.timeout_s = timeout_s  # the attempt is killed after this: keep inner timeouts below
        self.idempotency_key = idempotency_key
        self.log = logging.LoggerAdapter(
            logging.getLogger("conveyor.handler"), {"job_id": job_id, "attempt": attempt})
        self._step = step
        self._progress = progress
        self._enqueue = enqueue

    def step(self, name, fn):
        """Run fn once per job across all attempts; later attempts get the stored result."""
        if not isinstance(name, str) or not name:
            raise ValueError("step name must be a non-empty string")
        return self._step(name, fn)

    def progress(self, value):
        """Say how far the job has got: any JSON value (a number, {"done": 40, "total":
        100}...), shown as the job's `progress` while it runs and after. Call it as often as
        you like: the latest value is stored about once a second, and when the attempt
        ends. A value that is not JSON-serialisable raises TypeError."""
        try:
            progress_json = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ctx.progress takes a JSON-serialisable value: {exc}") from None
        self._progress(progress_json)

    def enqueue(self, type, payload=None, **options):
        """A follow-up job: `type` with `payload` and the options of a submission (queue,
        priority, delay_s or run_at, max_attempts, timeout_s, backoff, group, unique_key,
        unique_while, ttl_s or expires_at). It is created, with this job as its parent and
        its API key, if and only if this attempt's success is recorded, in the same
        transaction: an attempt that fails, crashes or is fenced creates none, so a retried
        job creates each follow-up once. Checked now: a bad one raises ValueError."""
        if self._enqueue is None:
            raise RuntimeError("ctx.enqueue is not available here")
        self._enqueue(type, {} if payload is None else payload, options)


_registry: dict = {}


def handler(name, *, queue=None, max_attempts=None, timeout_s=None,
            backoff_base_s=None, backoff_max_s=None, schema=None, concurrency=None, rate=None,
            group_concurrency=None):
    """Register the decorated function as the handler of job type `name`; concurrency,
    rate ("N/second|minute|hour") and group_concurrency limit its attempts across every
    host (SPEC §11)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise HandlerError(f"job type name {name!r} must match {NAME_PATTERN.pattern}")
    _check_positive(name, "max_attempts", max_attempts, integer=True)
    _check_positive(name, "timeout_s", timeout_s)
    _check_positive(name, "backoff_base_s", backoff_base_s, zero_ok=True)
    _check_positive(name, "backoff_max_s", backoff_max_s, zero_ok=True)
    _check_positive(name, "concurrency", concurrency, integer=True)
    _check_positive(name, "group_concurrency", group_concurrency, integer=True)
    if rate is not None:
        try:
            rate = parse_rate(rate)
        except ValueError as exc:
            raise HandlerError(f"job type {name!r}: rate must be {exc}") from None
    if schema is not None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise HandlerError(f"job type {name!r} has an invalid schema: {exc.message}") from None

    def register(fn):
        entry = Handler(name, fn, queue, max_attempts, timeout_s, backoff_base_s,
                        backoff_max_s, schema, concurrency, rate, group_concurrency)
        existing = _registry.get(name)
        if existing is not None and existing.origin != entry.origin:
            raise HandlerError(
                f"job type {name!r} is registered twice: by {existing.origin} and by {entry.origin}")
        _registry[name] = entry
        return fn

    return register


def _check_positive(name, option, value, *, integer=False, zero_ok=False):
    if value is None:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < 0 or (value == 0 and not zero_ok):
        raise HandlerError(f"job type {name!r}: {option} must be a positive number, got {value!r}")


def get(name):
    return _registry.get(name)


def registered():
    return dict(_registry)


def load(extra_paths=()):
    """Import every handler module: this folder's, then each folder in extra_paths."""
    here = os.path.dirname(os.path.abspath(__file__))
    for filename in _modules_in(here):
        _import(f"{__name__}.{filename[:-3]}", os.path.join(here, filename))
    for folder in extra_paths:
        folder = os.path.abspath(folder)
        if folder == here:
            continue
        tag = re.sub(r"\W", "_", folder)
        for filename in _modules_in(folder):
            _import(f"conveyor_handlers.{tag}.{filename[:-3]}", os.path.join(folder, filename))
    return registered()


def _modules_in(folder):
    if not os.path.isdir(folder):
        raise HandlerError(f"handler folder {folder} does not exist")
    return sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def _import(module_name, path):
    if module_name in sys.modules:
        return
    try:
        if module_name.startswith(f"{__name__}."):
            importlib.import_module(module_name)
            return
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    except HandlerError:
        raise
    except SyntaxError as exc:
        raise HandlerError(
            f"handler module {path} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        raise HandlerError(
            f"handler module {path} failed to import: {type(exc).__name__}: {exc}") from None
