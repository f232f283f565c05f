"""A Python client for Conveyor's HTTP API (see the README's HTTP API section). It needs
only `requests`: copy this one file into your project.

    from client import Conveyor
    c = Conveyor("http://localhost:5000", key)
    job = c.wait(c.submit("email.send", {"to": "ada@example.com"}), timeout=60)

Retries: 429 and 503 are retried after their Retry-After; a connection failure is retried
when the request is safe to repeat (a GET, a submission, or a request that never reached
the server). Each submission carries an Idempotency-Key (a new uuid per call unless you
give one), so the client's own retries never make a second job. Retries stop after
`max_retries` or once `max_retry_wait` seconds of waiting would be exceeded; the last
refusal is then raised. Every refusal is a ConveyorError subclass carrying the problem
document's status, title, detail and errors.

A client holds one `requests.Session` (keep-alive connections); requests does not promise
a Session is thread-safe, so give each thread its own client.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import random
import time
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterable, Iterator, Optional, Union
from urllib.parse import quote

import requests
from urllib3.exceptions import NewConnectionError

__all__ = ["Conveyor", "Job", "Attempt", "Backoff", "Schedule", "ScheduleRun", "Worker",
           "Callback", "Me", "verify_signature", "SignatureError", "SIGNATURE_HEADER",
           "Stats", "Queue", "Page", "ConveyorError", "BadRequest", "Unauthorized", "Forbidden",
           "NotFound", "Conflict", "TooLarge", "Invalid", "RateLimited", "Unavailable",
           "ConnectionFailed", "ServerError", "WaitTimeout", "FINAL_STATUSES"]

log = logging.getLogger("conveyor.client")

FINAL_STATUSES = ("succeeded", "dead", "cancelled")
SIGNATURE_HEADER = "Conveyor-Signature"
RETRIED_STATUSES = (429, 503)


# ---------------------------------------------------------------------------- errors

class ConveyorError(Exception):
    """A refusal from Conveyor: the HTTP status (None when no answer came), the problem's
    title and detail, and its `errors` list (one line per bad field or batch index)."""

    def __init__(self, detail, *, status=None, title=None, errors=(), retry_after=None):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.errors = list(errors)
        self.retry_after = retry_after  # seconds, from Retry-After (429 and 503)

    def __str__(self):
        head = " ".join(str(part) for part in (self.status, self.title) if part)
        text = f"{head}: {self.detail}" if head else str(self.detail)
        return f"{text} ({'; '.join(self.errors)})" if self.errors else text


class BadRequest(ConveyorError):
    """400: the body is not JSON, or not what the route takes."""


class Unauthorized(ConveyorError):
    """401: no API key, or an unknown or revoked one."""


class Forbidden(ConveyorError):
    """403: a submit key on an admin route."""


class NotFound(ConveyorError):
    """404: no such job or schedule (or another key's job)."""


class Conflict(ConveyorError):
    """409: the job's status does not allow this, a taken name, or an Idempotency-Key
    already used with another body."""


class TooLarge(ConveyorError):
    """413: a payload over MAX_PAYLOAD_BYTES or a body over MAX_REQUEST_BYTES."""


class Invalid(ConveyorError):
    """422: well-formed but not valid; `errors` says where."""


class RateLimited(ConveyorError):
    """429 after the retries: `retry_after` says when to try again."""


class Unavailable(ConveyorError):
    """503 after the retries: the database does not answer."""


class ConnectionFailed(Unavailable):
    """The server could not be reached, or the connection broke (status None).
    `never_sent`: no connection was made, so the request surely did not reach it."""

    never_sent = False


class ServerError(ConveyorError):
    """Any other 5xx."""


class SignatureError(Exception):
    """A callback whose Conveyor-Signature does not prove it came from Conveyor: missing
    or malformed, signed with another secret or over another body, or too old (a replay)."""


class WaitTimeout(ConveyorError, TimeoutError):
    """wait() ran out of time; `job` is the job as last seen."""

    def __init__(self, detail, job):
        super().__init__(detail)
        self.job = job


ERRORS = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
          413: TooLarge, 422: Invalid, 429: RateLimited, 503: Unavailable}


def _error(response):
    """The ConveyorError a non-2xx response stands for, from its problem+json body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # not Conveyor's problem document (a proxy's page?)
        body = {"detail": response.text.strip()[:300] or response.reason}
    status = response.status_code
    kind = ERRORS.get(status, ServerError if status >= 500 else ConveyorError)
    return kind(body.get("detail") or response.reason, status=status,
                title=body.get("title") or response.reason, errors=body.get("errors") or (),
                retry_after=_retry_after(response.headers.get("Retry-After")))


def _retry_after(value):
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- results

def _time(text):
    """An RFC 3339 time from the API as an aware datetime in UTC."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _from(cls, document, **convert):
    """cls from an API document: known fields only (a newer server may add some), each
    non-null value passed through its converter."""
    values = {f.name: document[f.name] for f in fields(cls) if f.name in document}
    for name, converter in convert.items():
        if values.get(name) is not None:
            values[name] = converter(values[name])
    return cls(**values)


@dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float


@dataclass(frozen=True)
class Attempt:
    """One run of a job by a worker, numbered from 1. `fenced`: a late outcome from it was
    refused (its worker had lost the job's lease)."""
    number: int
    status: str
    worker_id: str
    host: Optional[str]
    pid: Optional[int]
    started_at: datetime
    finished_at: Optional[datetime]
    duration_ms: Optional[float]
    error_type: Optional[str]
    error_message: Optional[str]
    traceback: Optional[str]
    fenced: bool

    @classmethod
    def from_document(cls, document):
        return _from(cls, document, started_at=_time, finished_at=_time)


@dataclass(frozen=True)
class Callback:
    """Where a job's callback stands: `status` pending, delivered or failed; `attempts`
    POSTs made since the job ended; `last_error` what the last failed one met."""
    status: str
    attempts: int
    last_error: Optional[str]


@dataclass(frozen=True)
class Job:
    """A job and where it stands: `status`, and `attempt`, the number of its latest attempt.
    `attempts` is filled by get() and wait() only (oldest first); `dead_reason` only on dead
    jobs; `progress` is what its handler last passed ctx.progress (None until it does)."""
    id: int
    type: str
    queue: str
    payload: dict
    priority: int
    run_at: datetime
    max_attempts: int
    timeout_s: float
    backoff: Backoff
    status: str
    attempt: int
    idempotency_key: Optional[str]
    result: Any
    last_error: Optional[str]
    created_at: datetime
    finished_at: Optional[datetime]
    dead_reason: Optional[str] = None
    cancel_requested_at: Optional[datetime] = None
    callback_url: Optional[str] = None
    callback: Optional[Callback] = None
    attempts: Optional[list[Attempt]] = None
    group: Optional[str] = None
    parent_id: Optional[int] = None  # a follow-up's parent (ctx.enqueue)
    unique_key: Optional[str] = None
    unique_while: Optional[str] = None
    expires_at: Optional[datetime] = None
    cancel_reason: Optional[str] = None  # "expired"
    progress: Any = None

    @property
    def finished(self):
        """True once succeeded, dead or cancelled."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_document(cls, document):
        return _from(cls, document, run_at=_time, created_at=_time, finished_at=_time,
                     cancel_requested_at=_time, expires_at=_time, backoff=lambda b: Backoff(**b),
                     callback=lambda c: _from(Callback, c),
                     attempts=lambda items: [Attempt.from_document(a) for a in items])


@dataclass(frozen=True)
class Me:
    """The API key in use (GET /v1/me): `callback_secret` is what verify_signature checks
    its jobs' callbacks with."""
    name: str
    role: str
    rate_limit: str
    callback_secret: str


@dataclass(frozen=True)
class ScheduleRun:
    """One slot of a schedule: `outcome` is enqueued, skipped or failed."""
    slot: datetime
    outcome: str
    job_id: Optional[int]
    job_status: Optional[str]
    reason: Optional[str]
    fired_at: datetime

    @classmethod
    def from_document(cls, document):
        return _from(cls, document, slot=_time, fired_at=_time)


@dataclass(frozen=True)
class Schedule:
    """A job enqueued on a cron (see the README's Schedules section). `next_runs` and
    `recent_runs` come with one schedule's page (get, create, update), not with lists."""
    name: str
    cron: str
    type: str
    payload: dict
    queue: Optional[str]
    priority: int
    timezone: str
    overlap: str
    paused: bool
    next_run_at: Optional[datetime]
    created_at: datetime
    updated_at: datetime
    next_runs: Optional[list[datetime]] = None
    recent_runs: Optional[list[ScheduleRun]] = None

    @classmethod
    def from_document(cls, document):
        return _from(cls, document, next_run_at=_time, created_at=_time, updated_at=_time,
                     next_runs=lambda items: [_time(t) for t in items],
                     recent_runs=lambda items: [ScheduleRun.from_document(r) for r in items])


@dataclass(frozen=True)
class Worker:
    """A live worker process."""
    id: str
    supervisor_id: str
    host: str
    pid: int
    queues: list[str]
    started_at: datetime
    last_heartbeat_at: datetime
    current_job_id: Optional[int]

    @classmethod
    def from_document(cls, document):
        return _from(cls, document, started_at=_time, last_heartbeat_at=_time)


@dataclass(frozen=True)
class Stats:
    """`queues`: {queue: {status: count}}; `totals`: {status: count}."""
    queues: dict[str, dict[str, int]]
    totals: dict[str, int]
    oldest_available_age_s: float
    workers_alive: int

    @classmethod
    def from_document(cls, document):
        return _from(cls, document)


@dataclass(frozen=True)
class Queue:
    """A queue: `counts` of its jobs by status, and its settings (`rate` as "10/second";
    None: no limit). `updated_at` is None for a queue whose settings were never set."""
    name: str
    counts: dict[str, int]
    paused: bool
    concurrency: Optional[int]
    rate: Optional[str]
    updated_at: Optional[datetime]

    @classmethod
    def from_document(cls, document):
        return _from(cls, document, updated_at=_time)


JobRef = Union[int, Job]  # where a job is asked for, its id or the Job itself


@dataclass(frozen=True)
class Page:
    """One page of a list: pass `next_cursor` as `cursor` for the next (None: last page)."""
    items: list
    next_cursor: Optional[str]


# ---------------------------------------------------------------------------- the client

class Conveyor:
    """The HTTP API of one Conveyor deployment, with one API key.

    url: the base URL (``http://localhost:5000``); key: an API key from `flask keys create`.
    timeout: seconds per HTTP request. max_retries, max_retry_wait: the retry budget of one
    call (how many retries, and how many seconds from its start). session: a
    requests.Session of your own (proxies, TLS), which gets this client's headers.
    """

    def __init__(self, url: str, key: str, *, timeout: float = 30.0, max_retries: int = 5,
                 max_retry_wait: float = 60.0, session: Optional[requests.Session] = None):
        self.url = url.rstrip("/")
        self.timeout, self.max_retries, self.max_retry_wait = timeout, max_retries, max_retry_wait
        self.session = session or requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {key}",
                                     "User-Agent": "conveyor-client/1"})
        self.dlq = DeadLetterQueue(self)
        self.jobs = Jobs(self)
        self.schedules = Schedules(self)
        self.queues = Queues(self)

    def close(self):
        """Close the client's connections now. (urllib3 2 otherwise closes an idle pooled
        connection only when its pool is garbage-collected, which a reference cycle left
        by a broken connection can put off indefinitely.)"""
        for adapter in self.session.adapters.values():
            pools = getattr(getattr(adapter, "poolmanager", None), "pools", None)
            for pool_key in list(pools.keys()) if pools is not None else ():
                pools[pool_key].close()
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ------------------------------------------------------------------------ jobs

    def submit(self, type: str, payload: Optional[dict] = None, *,
               queue: Optional[str] = None, priority: Optional[int] = None,
               run_at: Union[datetime, str, None] = None,
               delay_s: Union[float, timedelta, None] = None,
               max_attempts: Optional[int] = None, timeout_s: Optional[float] = None,
               backoff: Union[Backoff, dict, None] = None,
               idempotency_key: Optional[str] = None, group: Optional[str] = None,
               unique_key: Optional[str] = None, unique_while: Optional[str] = None,
               ttl_s: Union[float, timedelta, None] = None,
               expires_at: Union[datetime, str, None] = None,
               callback_url: Optional[str] = None) -> Job:
        """Submit one job; returns it. run_at: a datetime with a timezone or an RFC 3339
        string; delay_s: seconds or a timedelta; backoff: {"base_s": .., "max_s": ..};
        group: what its type's group_concurrency counts by (a customer id, say).
        unique_key: while a job of this type holds the key ("queued", the default, or
        "active": also while it runs), the submission returns that job instead.
        ttl_s (or expires_at): not started by then, the job never starts (it ends
        cancelled, cancel_reason "expired").
        callback_url: an http(s) URL the job's document is POSTed to once it ends, signed
        with this key's callback secret (check it with verify_signature).
        Without an idempotency_key the call gets its own uuid, so its retries make one job;
        with one, a repeat of the same submission returns the first job (another body:
        Conflict)."""
        body = _submission(type, payload, queue=queue, priority=priority, run_at=run_at,
                           delay_s=delay_s, max_attempts=max_attempts, timeout_s=timeout_s,
                           backoff=backoff, group=group, unique_key=unique_key,
                           unique_while=unique_while, ttl_s=ttl_s, expires_at=expires_at,
                           callback_url=callback_url)
        key = idempotency_key or str(uuid.uuid4())
        return Job.from_document(self._json("POST", "/v1/jobs", body=body, safe=True,
                                            headers={"Idempotency-Key": key}))

    def submit_batch(self, jobs: Iterable[dict]) -> list[Job]:
        """Submit up to 1000 jobs in one transaction, all or none (Invalid names each bad
        index). Each item is a dict like the API's ({"type": .., "payload": .., ...});
        items without an idempotency_key get a uuid, so a retried batch makes no
        duplicates. Returns the jobs in the order given."""
        items = [{**item, "idempotency_key": item.get("idempotency_key") or str(uuid.uuid4())}
                 for item in jobs]
        document = self._json("POST", "/v1/jobs/batch", body={"jobs": items}, safe=True)
        return [Job.from_document(item) for item in document["items"]]

    def get(self, job_id: JobRef) -> Job:
        """A job with its attempts."""
        return Job.from_document(self._json("GET", f"/v1/jobs/{_id(job_id)}"))

    def list(self, *, status: Optional[str] = None, type: Optional[str] = None,
             queue: Optional[str] = None, parent_id: Optional[JobRef] = None,
             page_size: int = 100) -> Iterator[Job]:
        """Every job matching the filters, newest first, fetched a page at a time;
        parent_id: the follow-ups of that job."""
        return self._every("/v1/jobs", Job, status=status, type=type, queue=queue,
                           parent_id=None if parent_id is None else _id(parent_id),
                           limit=page_size)

    def list_page(self, *, status: Optional[str] = None, type: Optional[str] = None,
                  queue: Optional[str] = None, parent_id: Optional[JobRef] = None,
                  limit: Optional[int] = None, cursor: Optional[str] = None) -> Page:
        """One page of jobs, newest first."""
        return self._page("/v1/jobs", Job, status=status, type=type, queue=queue,
                          parent_id=None if parent_id is None else _id(parent_id),
                          limit=limit, cursor=cursor)

    def wait(self, job_id: JobRef, timeout: Optional[float] = 60.0, *,
             poll_interval: float = 0.1, max_poll_interval: float = 2.0,
             on_progress: Optional[Callable[[Job], Any]] = None) -> Job:
        """Poll a job until it is succeeded, dead or cancelled and return it (with its
        attempts; check `status`). Polls start every poll_interval seconds and slow down
        to max_poll_interval. Each new `progress` seen is logged (INFO, logger
        conveyor.client) and passed to on_progress with the job, e.g.
        ``on_progress=lambda job: print(job.progress)``. Raises WaitTimeout (with the job
        as last seen) after timeout seconds; timeout=None waits as long as it takes."""
        job_id = _id(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll_interval
        progress = None
        while True:
            job = self.get(job_id)
            if job.progress != progress:
                progress = job.progress
                log.info("job %d progress: %s", job_id, progress)
                if on_progress is not None:
                    on_progress(job)
            if job.finished:
                return job
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(f"job {job_id} is still {job.status} after {timeout:g}s",
                                  job)
            time.sleep(interval if remaining is None else min(interval, remaining))
            interval = min(interval * 1.5, max_poll_interval)

    def cancel(self, job_id: JobRef) -> Job:
        """Cancel a job: a waiting one at once, a running one is stopped within seconds
        (its status says which). Conflict if it already ended."""
        return Job.from_document(self._json("POST", f"/v1/jobs/{_id(job_id)}/cancel"))

    # ------------------------------------------------------------------------ operations

    def me(self) -> Me:
        """The API key in use, with the secret its jobs' callbacks are signed with."""
        return _from(Me, self._json("GET", "/v1/me"))

    def stats(self) -> Stats:
        """Job counts by queue and status, the oldest available job's age, live workers
        (admin key)."""
        return Stats.from_document(self._json("GET", "/v1/stats"))

    def workers(self) -> list[Worker]:
        """The live worker processes (admin key)."""
        return [Worker.from_document(w) for w in self._json("GET", "/v1/workers")["items"]]

    def health(self) -> bool:
        """True when the server can serve, False when it answers 503: its database does not
        answer, or its rate-limit storage does not while RATE_LIMIT_ON_STORAGE_ERROR is
        `closed`. Not retried; ConnectionFailed when the server cannot be reached."""
        outcome = self._once("GET", "/healthz", None, None, None)
        if isinstance(outcome, Unavailable) and outcome.status == 503:
            return False
        if isinstance(outcome, ConveyorError):
            raise outcome
        return True

    # ------------------------------------------------------------------------ plumbing

    def _json(self, method, path, *, body=None, params=None, headers=None, safe=None):
        """The JSON of a 2xx answer (None for 204), after retrying 429 and 503 (and a
        broken connection when the call is safe to repeat: by default only a GET is);
        otherwise the refusal is raised."""
        safe = method == "GET" if safe is None else safe
        started, retry = time.monotonic(), 0
        while True:
            outcome = self._once(method, path, body, params, headers)
            if not isinstance(outcome, ConveyorError):
                return outcome
            if isinstance(outcome, ConnectionFailed):
                if not (safe or outcome.never_sent):
                    raise outcome
                delay = _backoff(retry)
            elif outcome.status in RETRIED_STATUSES:
                delay = outcome.retry_after if outcome.retry_after is not None else _backoff(retry)
            else:
                raise outcome
            out_of_time = time.monotonic() - started + delay > self.max_retry_wait
            if retry == self.max_retries or out_of_time:
                raise outcome
            retry += 1
            log.info("%s %s: %s; retry %d of %d in %.2fs", method, path, outcome, retry,
                     self.max_retries, delay)
            time.sleep(delay)

    def _once(self, method, path, body, params, headers):
        """One request: the JSON of a 2xx answer (None for 204), else the ConveyorError it
        stands for, returned rather than raised. The response dies here: a refusal kept
        in a traceback must not keep its connection (and with it the server) busy."""
        try:
            response = self.session.request(method, self.url + path, json=body,
                                            params=params, headers=headers,
                                            timeout=self.timeout)
        except _CONNECTION_ERRORS as exc:
            failure = ConnectionFailed(f"{method} {path}: {exc}")
            failure.never_sent = _never_sent(exc)
            return failure
        with response:
            if response.status_code >= 400:
                return _error(response)
            if response.status_code == 204:
                return None
            try:
                return response.json()
            except ValueError:
                return ServerError(f"{method} {path} answered {response.status_code} with "
                                   f"something that is not JSON", status=response.status_code,
                                   title=response.reason)

    def _page(self, path, kind, **params):
        document = self._json("GET", path, params=params)
        return Page([kind.from_document(item) for item in document["items"]],
                    document["next_cursor"])

    def _every(self, path, kind, **params):
        cursor = None
        while True:
            page = self._page(path, kind, **params, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


class DeadLetterQueue:
    """`client.dlq`: dead jobs (admin key)."""

    def __init__(self, client):
        self._client = client

    def list(self, *, type: Optional[str] = None, queue: Optional[str] = None,
             page_size: int = 100) -> Iterator[Job]:
        """Every dead job, newest first, with `dead_reason` and `last_error`."""
        return self._client._every("/v1/dlq", Job, type=type, queue=queue, limit=page_size)

    def list_page(self, *, type: Optional[str] = None, queue: Optional[str] = None,
                  limit: Optional[int] = None, cursor: Optional[str] = None) -> Page:
        return self._client._page("/v1/dlq", Job, type=type, queue=queue, limit=limit,
                                  cursor=cursor)

    def retry(self, job_id: JobRef) -> Job:
        """Run a dead job again with a fresh attempt budget (its history is kept)."""
        return Job.from_document(self._client._json("POST", f"/v1/dlq/{_id(job_id)}/retry"))

    def discard(self, job_id: JobRef) -> Job:
        """Discard a dead job: it becomes cancelled (its history is kept)."""
        return Job.from_document(self._client._json("DELETE", f"/v1/dlq/{_id(job_id)}"))

    def retry_all(self, *, type: Optional[str] = None, queue: Optional[str] = None,
                  group: Optional[str] = None,
                  created_before: Union[datetime, str, None] = None) -> int:
        """Run every dead job matching all the filters given again, as retry() does one
        (no filter: every dead job); returns how many went back to the queue."""
        return self._client._json("POST", "/v1/dlq/retry", body=_selection(
            type=type, queue=queue, group=group, created_before=created_before))["count"]


class Jobs:
    """`client.jobs`: jobs in bulk (admin key); one job's calls are the client's own."""

    def __init__(self, client):
        self._client = client

    def cancel_all(self, *, type: Optional[str] = None, queue: Optional[str] = None,
                   group: Optional[str] = None,
                   created_before: Union[datetime, str, None] = None) -> int:
        """Cancel every job not yet ended that matches all the filters given, as cancel()
        does one (no filter: every such job): waiting ones at once, running ones are
        stopped within seconds. Returns how many."""
        return self._client._json("POST", "/v1/jobs/cancel", body=_selection(
            type=type, queue=queue, group=group, created_before=created_before))["count"]


class Schedules:
    """`client.schedules`: recurring jobs (admin key)."""

    def __init__(self, client):
        self._client = client

    def create(self, name: str, cron: str, type: str, payload: Optional[dict] = None, *,
               queue: Optional[str] = None, priority: Optional[int] = None,
               timezone: Optional[str] = None, overlap: Optional[str] = None,
               paused: Optional[bool] = None) -> Schedule:
        """A new schedule; it first fires at its next slot. Conflict if the name is taken."""
        body = {"name": name, "cron": cron, "type": type, "payload": payload or {},
                "queue": queue, "priority": priority, "timezone": timezone,
                "overlap": overlap, "paused": paused}
        return Schedule.from_document(self._client._json(
            "POST", "/v1/schedules", body={k: v for k, v in body.items() if v is not None}))

    def get(self, name: str) -> Schedule:
        """A schedule with its next runs and recent runs."""
        return Schedule.from_document(self._client._json("GET", _schedule_path(name)))

    def list(self, *, page_size: int = 100) -> Iterator[Schedule]:
        """Every schedule, by name."""
        return self._client._every("/v1/schedules", Schedule, limit=page_size)

    def list_page(self, *, limit: Optional[int] = None, cursor: Optional[str] = None) -> Page:
        return self._client._page("/v1/schedules", Schedule, limit=limit, cursor=cursor)

    def update(self, name: str, **changes: Any) -> Schedule:
        """Change any of cron, type, payload, queue (None: the type's own), priority,
        timezone, overlap and paused (True pauses, False resumes from the next slot)."""
        return Schedule.from_document(self._client._json("PATCH", _schedule_path(name),
                                                         body=changes))

    def delete(self, name: str) -> None:
        """Delete a schedule; the jobs it enqueued stay."""
        self._client._json("DELETE", _schedule_path(name))


class Queues:
    """`client.queues`: pause, resume and limit queues (admin key)."""

    def __init__(self, client):
        self._client = client

    def list(self) -> list[Queue]:
        """Every queue with jobs or settings, by name."""
        return [Queue.from_document(q) for q in self._client._json("GET", "/v1/queues")["items"]]

    def update(self, name: str, **changes: Any) -> Queue:
        """Change any of paused, concurrency (an int; None clears it) and rate ("10/second",
        "600/minute", "3600/hour"; None clears it); the others keep their value."""
        return Queue.from_document(self._client._json("PATCH", _queue_path(name), body=changes))

    def pause(self, name: str) -> Queue:
        """No attempt of the queue's jobs starts until it is resumed (running ones finish)."""
        return self.update(name, paused=True)

    def resume(self, name: str) -> Queue:
        """Let a paused queue's jobs start again."""
        return self.update(name, paused=False)


_CONNECTION_ERRORS = (requests.ConnectionError, requests.Timeout,
                      requests.exceptions.ChunkedEncodingError)


def _never_sent(exc):
    """True when the request surely did not reach the server (no connection was made),
    so even a call that is not safe to repeat may be retried."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, NewConnectionError)


def _backoff(retry):
    """Seconds before retry number retry+1 when the server named no time: exponential,
    full jitter, 0.1s to 5s."""
    return random.uniform(0, min(5.0, 0.1 * 2 ** retry))


def _id(job):
    """A job id from an int or a Job."""
    return int(job.id if isinstance(job, Job) else job)


def _schedule_path(name):
    return f"/v1/schedules/{quote(name, safe='')}"


def _queue_path(name):
    return f"/v1/queues/{quote(name, safe='')}"


def _selection(**filters):
    """The body of a bulk call: the filters given, times as RFC 3339."""
    if isinstance(filters.get("created_before"), datetime):
        filters["created_before"] = filters["created_before"].isoformat()
    return {name: value for name, value in filters.items() if value is not None}


def _submission(type, payload, **options):
    body = {"type": type, "payload": payload or {}}
    if isinstance(options.get("run_at"), datetime):
        options["run_at"] = options["run_at"].isoformat()
    for name in ("delay_s", "ttl_s"):
        if isinstance(options.get(name), timedelta):
            options[name] = options[name].total_seconds()
    if isinstance(options.get("expires_at"), datetime):
        options["expires_at"] = options["expires_at"].isoformat()
    if isinstance(options.get("backoff"), Backoff):
        options["backoff"] = {"base_s": options["backoff"].base_s,
                              "max_s": options["backoff"].max_s}
    body.update({name: value for name, value in options.items() if value is not None})
    return body


# ---------------------------------------------------------------------------- callbacks

def verify_signature(secret: str, body: Union[bytes, str], header: Optional[str], *,
                     tolerance_s: float = 300.0, now: Optional[float] = None) -> int:
    """Check a callback's Conveyor-Signature header (`t=<unix time>,v1=<hex HMAC-SHA256 of
    "<t>.<body>">`) against the raw body as received and the key's callback_secret
    (Conveyor.me()). Returns the signed time; raises SignatureError when the header is
    missing or malformed, when no v1 matches (compared in constant time), or when t is more
    than tolerance_s seconds away from now (a replayed delivery).

        verify_signature(secret, request.get_data(), request.headers.get(SIGNATURE_HEADER))
    """
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    parts = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for name, _, value in parts if name == "t"]
    signatures = [value for name, _, value in parts if name == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not signatures:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: {header[:200]!r}")
    timestamp = int(stamps[0])
    payload = body.encode() if isinstance(body, str) else bytes(body)
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload,
                        hashlib.sha256).hexdigest()
    # Every v1 is compared, each in constant time: a match must not return earlier.
    matched = [hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))
               for signature in signatures]
    if not any(matched):
        raise SignatureError("the signature does not match this secret and body")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise SignatureError(f"the signature is {age:.0f}s old, outside the tolerance of "
                             f"{tolerance_s:g}s")
    return timestamp
