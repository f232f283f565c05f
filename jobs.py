"""Core job operations: the one owner of every job state change.

Enqueue, claim, heartbeat, finish (succeed, retry, dead-letter), reap, cancel, DLQ
retry/discard and prune live here; routes, CLI commands, the supervisor and its workers
only call them. Every UPDATE that moves a job names the state, attempt and lease it
expects, and "0 rows" means someone else owns the job now: that is the fencing of SPEC §4.
"""
import base64
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import peewee as pw
from jsonschema import Draft202012Validator

import handlers
import metrics
from config import settings
from models import Attempt, Job, Step, Worker, db, is_postgres, now

PENDING = ("available", "scheduled", "retryable")
FINAL = ("succeeded", "dead", "cancelled")
STATUSES = ("scheduled", "available", "running", "succeeded", "retryable", "dead", "cancelled")
ATTEMPT_STATUSES = ("running", "succeeded", "failed", "timed_out", "crashed", "interrupted",
                    "cancelled")
# "$(?!\n)": a JSON Schema pattern is a search, and "$" alone also matches before a final
# newline, which would let "default\n" through as a queue name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$(?!\n)"
MAX_LIMIT = 500
MAX_BATCH = 1000

log = logging.getLogger("conveyor.jobs")


class JobError(Exception):
    """An expected refusal, carrying the HTTP status a route should answer with."""
    status = 400
    title = "Bad request"

    def __init__(self, detail, errors=None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class Invalid(JobError):
    status, title = 422, "Invalid job"


class NotFound(JobError):
    status, title = 404, "Not found"


class Conflict(JobError):
    status, title = 409, "Conflict"


class TooLarge(JobError):
    status, title = 413, "Payload too large"


# ---------------------------------------------------------------------------- submission

SUBMISSION_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "minLength": 1, "maxLength": 100},
        "payload": {"type": "object"},
        "queue": {"type": "string", "pattern": NAME_PATTERN},
        "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
        "run_at": {"type": "string", "format": "date-time", "maxLength": 64},
        "delay_s": {"type": "number", "minimum": 0, "maximum": 10 * 365 * 86400},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 7 * 86400},
        "backoff": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "base_s": {"type": "number", "minimum": 0, "maximum": 7 * 86400},
                "max_s": {"type": "number", "minimum": 0, "maximum": 30 * 86400},
            },
        },
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 255,
                            "pattern": r"^[\x20-\x7e]+$(?!\n)"},
    },
}
_submission_validator = Draft202012Validator(SUBMISSION_SCHEMA)


@dataclass(frozen=True)
class NewJob:
    """A validated submission with every default resolved (the job's effective values)."""
    type: str
    payload: dict
    queue: str
    priority: int
    run_at: Optional[float]
    delay_s: float
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float
    idempotency_key: Optional[str] = None
    request_hash: Optional[str] = None


def parse_time(text, name="run_at"):
    """An RFC 3339 string with any offset, as UTC epoch seconds."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except (ValueError, AttributeError):
        raise Invalid(f"{name} is not an RFC 3339 time: {text!r}") from None
    if parsed.tzinfo is None:
        raise Invalid(f"{name} needs a UTC offset (e.g. 2030-01-01T09:00:00Z): {text!r}")
    try:
        return parsed.astimezone(timezone.utc).timestamp()
    except OverflowError:  # in UTC it falls outside years 1 to 9999, so it cannot be shown
        raise Invalid(f"{name} is out of range: {text!r}") from None


def request_fingerprint(body):
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_submission(body, idempotency_key=None):
    """Check one submission and resolve its defaults; raise Invalid or TooLarge."""
    if not isinstance(body, dict):
        raise Invalid("a job must be a JSON object", ["(job): must be an object"])
    try:
        # JSON Schema's "number" lets NaN through (a CLI float, a parsed 1e999 is infinity):
        # it would break the NOT NULL columns, every timeout and every JSON reader.
        json.dumps(body, allow_nan=False)
    except ValueError:
        raise Invalid("the job holds NaN or Infinity, which are not JSON numbers",
                      ["(job): NaN and Infinity are not allowed"]) from None
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(job)'}: {e.message}"
              for e in _submission_validator.iter_errors(body)]
    if errors:
        raise Invalid("the job is not valid", errors)
    if "run_at" in body and "delay_s" in body:
        raise Invalid("give run_at or delay_s, not both", ["run_at: not allowed with delay_s"])
    handler = handlers.get(body["type"])
    if handler is None:
        raise Invalid(f"unknown job type {body['type']!r}", [f"type: {body['type']!r} is not registered"])
    payload = body.get("payload", {})
    size = len(json.dumps(payload, separators=(",", ":")).encode())
    limit = settings().max_payload_bytes
    if size > limit:
        raise TooLarge(f"the payload is {size} bytes, over the limit of {limit}")
    payload_errors = handler.payload_errors(payload)
    if payload_errors:
        raise Invalid(f"the payload does not match the schema of {handler.name!r}",
                      payload_errors)
    conf = settings()
    backoff = body.get("backoff", {})
    base = _first(backoff.get("base_s"), handler.backoff_base_s, conf.backoff_base_s)
    cap = _first(backoff.get("max_s"), handler.backoff_max_s, conf.backoff_max_s)
    if cap < base:
        raise Invalid("backoff max_s must be at least base_s", ["backoff/max_s: below base_s"])
    key = body.get("idempotency_key", idempotency_key)
    return NewJob(
        type=handler.name,
        payload=payload,
        queue=_first(body.get("queue"), handler.queue, "default"),
        priority=int(body.get("priority", 0)),
        run_at=parse_time(body["run_at"]) if "run_at" in body else None,
        delay_s=float(body.get("delay_s", 0)),
        max_attempts=int(_first(body.get("max_attempts"), handler.max_attempts,
                                conf.default_max_attempts)),
        timeout_s=float(_first(body.get("timeout_s"), handler.timeout_s, conf.default_timeout_s)),
        backoff_base_s=float(base),
        backoff_max_s=float(cap),
        idempotency_key=key,
        request_hash=request_fingerprint(body) if key is not None else None,
    )


def _first(*values):
    return next(v for v in values if v is not None)


# ---------------------------------------------------------------------------- enqueue

def db_time():
    """The database's clock, in epoch seconds (SQLite lives on this host: its clock is ours)."""
    if is_postgres():
        return db.execute_sql("SELECT extract(epoch from clock_timestamp())::float8").fetchone()[0]
    return time.time()


def enqueue(new_jobs, api_key_id=None):
    """Insert jobs in one transaction; return [(job, created)] in the order given.

    A job with an idempotency key that this API key already used returns the existing
    job (created=False) when the request matches, and raises Conflict when it differs;
    the unique index decides, so concurrent identical requests make one job.
    """
    with db.atomic():
        current = db_time()
        rows = [_row(new, current, api_key_id) for new in new_jobs]
        ids = [None] * len(rows)
        plain = [i for i, new in enumerate(new_jobs) if new.idempotency_key is None]
        if plain:
            inserted = (Job.insert_many([rows[i] for i in plain]).returning(Job.id)
                        .execute())
            for i, job_id in zip(plain, sorted(r.id for r in inserted)):
                ids[i] = job_id
        created = [True] * len(rows)
        conflicts = []
        for i, new in enumerate(new_jobs):
            if new.idempotency_key is None:
                continue
            inserted = list(Job.insert(rows[i]).on_conflict(action="NOTHING")
                            .returning(Job.id).execute())
            if inserted:
                ids[i] = inserted[0].id
                continue
            existing = (Job.select(Job.id, Job.request_hash)
                        .where(pw.fn.COALESCE(Job.api_key_id, 0) == (api_key_id or 0),
                               Job.idempotency_key == new.idempotency_key).first())
            if existing is None:
                raise Conflict("the job could not be stored; try again")
            if existing.request_hash != new.request_hash:
                conflicts.append(i)
            ids[i], created[i] = existing.id, False
        if conflicts:
            raise Conflict("an idempotency key was already used for a different job",
                           [f"{i}: idempotency key {new_jobs[i].idempotency_key!r} was used "
                            f"for a different request (job {ids[i]})" for i in conflicts])
        by_id = {job.id: job for job in Job.select().where(Job.id.in_(ids))}
    stored = [(by_id[job_id], was_created) for job_id, was_created in zip(ids, created)]
    for job, was_created in stored:
        if was_created:
            metrics.count("conveyor_jobs_submitted", type=job.type, queue=job.queue)
            _event(logging.INFO, "submitted", job,
                   f"{job.status}, run at {job.run_at:.3f}" if job.status == "scheduled"
                   else job.status)
    return stored


def _row(new, current, api_key_id):
    run_at = new.run_at if new.run_at is not None else current + new.delay_s
    return {
        "type": new.type, "queue": new.queue, "payload": new.payload,
        "priority": new.priority, "run_at": run_at,
        "status": "scheduled" if run_at > current else "available",
        "max_attempts": new.max_attempts, "timeout_s": new.timeout_s,
        "backoff_base_s": new.backoff_base_s, "backoff_max_s": new.backoff_max_s,
        "idempotency_key": new.idempotency_key, "request_hash": new.request_hash,
        "api_key_id": api_key_id, "created_at": current,
    }


# ---------------------------------------------------------------------------- claim

@dataclass(frozen=True)
class WorkerInfo:
    id: str
    supervisor_id: str
    host: str
    pid: int
    queues: tuple = ()


def claim(worker, limit=1):
    """Lease up to `limit` due jobs to `worker`, starting a new attempt of each."""
    if not is_postgres() and not _any_due(worker.queues):
        return []  # spare SQLite's single write lock when there is nothing to take
    candidates = (Job.select(Job.id)
                  .where(Job.status.in_(PENDING), Job.run_at <= now())
                  .order_by(Job.priority, Job.run_at, Job.id)
                  .limit(limit))
    if worker.queues:
        candidates = candidates.where(Job.queue.in_(worker.queues))
    if is_postgres():
        candidates = candidates.for_update("FOR UPDATE SKIP LOCKED")
    with db.atomic():
        claimed = list(Job.update(status="running", attempt=Job.attempt + 1,
                                  lease_owner=worker.id, heartbeat_at=now(), started_at=now())
                       .where(Job.id.in_(candidates))
                       .returning(Job).execute())
        if claimed:
            Attempt.insert_many([{
                "job_id": job.id, "number": job.attempt, "status": "running",
                "worker_id": worker.id, "host": worker.host, "pid": worker.pid,
                "started_at": job.started_at} for job in claimed]).execute()
    claimed.sort(key=lambda job: (job.priority, job.run_at, job.id))
    for job in claimed:
        _event(logging.INFO, "started", job, f"attempt {job.attempt} on {worker.id}",
               attempt=job.attempt, worker_id=worker.id)
    return claimed


def _any_due(queues):
    query = Job.select(Job.id).where(Job.status.in_(PENDING), Job.run_at <= now())
    if queues:
        query = query.where(Job.queue.in_(queues))
    return query.exists()


def stage_due():
    """Mark scheduled and retryable jobs whose time has come `available` (claim takes them
    either way; this keeps the stored status true for readers)."""
    return (Job.update(status="available")
            .where(Job.status.in_(("scheduled", "retryable")), Job.run_at <= now())
            .execute())


# ---------------------------------------------------------------------------- heartbeat

def heartbeat(worker, job=None):
    """Renew the worker's registration and its job's lease; False when the lease is lost."""
    with db.atomic():
        updated = (Worker.update(last_heartbeat_at=now())
                   .where(Worker.id == worker.id).execute())
        if not updated:
            register_worker(worker)
        if job is None:
            return True
        return bool(Job.update(heartbeat_at=now())
                    .where(_holds(job)).execute())


def _holds(job):
    """The SQL condition "job is still running this attempt under this lease"."""
    return ((Job.id == job.id) & (Job.status == "running")
            & (Job.attempt == job.attempt) & (Job.lease_owner == job.lease_owner))


def lease_held(job):
    return Job.select(Job.id).where(_holds(job)).exists()


# ---------------------------------------------------------------------------- outcomes

@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: its attempt status plus what the retry policy needs."""
    status: str
    result: Any = None
    error_type: Optional[str] = None
    error_message: Optional[str] = None
    traceback: Optional[str] = None
    retry_in: Optional[float] = None
    permanent: bool = False

    @property
    def error(self):
        if self.error_type is None:
            return None
        return f"{self.error_type}: {self.error_message}" if self.error_message else self.error_type


@dataclass(frozen=True)
class Transition:
    status: str
    delay_s: Optional[float] = None
    dead_reason: Optional[str] = None


def backoff_delay(attempts_used, base_s, max_s, rand=random.random):
    """Exponential backoff with full jitter: random(0, min(max, base * 2**(n-1)))."""
    exponent = min(attempts_used - 1, 1023)  # 2.0 ** 1024 overflows a float
    return rand() * min(max_s, base_s * math.pow(2, exponent))


def next_transition(job, outcome):
    """The retry policy: where a running job goes when its attempt ends with outcome."""
    if outcome.status == "succeeded":
        return Transition("succeeded")
    if outcome.status == "cancelled":
        return Transition("cancelled")
    if outcome.permanent:
        return Transition("dead", dead_reason="permanent")
    attempts_used = job.attempt - job.attempt_base
    if attempts_used >= job.max_attempts:
        return Transition("dead", dead_reason="max_attempts")
    if outcome.retry_in is not None:
        return Transition("retryable", delay_s=outcome.retry_in)
    if outcome.status == "interrupted":
        return Transition("retryable", delay_s=0.0)
    return Transition("retryable", delay_s=backoff_delay(
        attempts_used, job.backoff_base_s, job.backoff_max_s))


def report(job, outcome):
    """A worker reports its attempt's outcome. False when its lease was lost: the outcome
    is refused, the attempt is marked fenced and the job is left as it is."""
    with db.atomic():
        finished = _finish(job, outcome, _holds(job))
        if finished is None:
            recorded = Attempt.get_or_none(Attempt.job_id == job.id,
                                           Attempt.number == job.attempt)
            if recorded is not None and recorded.status == outcome.status:
                return True  # our own report committed before the connection dropped
            (Attempt.update(fenced=True)
             .where(Attempt.job_id == job.id, Attempt.number == job.attempt).execute())
    if finished is None:
        _event(logging.WARNING, "refused", job,
               f"late outcome refused: attempt {job.attempt} {outcome.status} after its lease "
               f"was lost", attempt=job.attempt, worker_id=job.lease_owner)
        return False
    _announce(finished)
    return True


def end_attempts(worker_id, outcome, job_id=None):
    """A supervisor ends the running attempts of its worker (crash, timeout, shutdown
    kill, cancellation); returns the jobs it ended."""
    query = Job.select().where(Job.status == "running", Job.lease_owner == worker_id)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    ended = []
    for job in query:
        with db.atomic():
            finished = _finish(job, outcome, _holds(job))
        if finished is not None:
            _announce(finished)
            ended.append(job)
    return ended


def reap_expired(lease_s, limit=100):
    """Mark attempts whose heartbeat is older than the lease `crashed`; any process may call
    this. The guard re-checks staleness, so a heartbeat that lands first wins."""
    stale = (Job.select()
             .where(Job.status == "running", Job.heartbeat_at < now() - lease_s)
             .order_by(Job.heartbeat_at).limit(limit))
    outcome = Outcome("crashed", error_type="LeaseExpired",
                      error_message=f"no heartbeat for over {lease_s:g}s: worker or host lost")
    reaped = []
    for job in stale:
        guard = _holds(job) & (Job.heartbeat_at < now() - lease_s)
        if is_postgres():
            # A row another session holds locked (one cut off or stalled mid-transaction,
            # until the server ends it) waits for a later round instead of stalling us.
            guard &= Job.id.in_(Job.select(Job.id).where(Job.id == job.id)
                                .for_update("FOR UPDATE SKIP LOCKED"))
        with db.atomic():
            finished = _finish(job, outcome, guard)
        if finished is not None:
            metrics.count("conveyor_attempts_reaped", type=job.type, queue=job.queue)
            _announce(finished, event="reaped")
            reaped.append(job)
    return reaped


@dataclass(frozen=True)
class Finished:
    """What _finish did to a job: the outcome it recorded and where the job went."""
    job: Any
    outcome: Outcome
    status: str
    dead_reason: Optional[str]
    run_at: float
    duration_s: Optional[float]


def _finish(job, outcome, guard):
    """Apply the retry policy to a running job under guard; None if another process owns
    the job now, else what was done (to announce once the transaction commits)."""
    move = next_transition(job, outcome)
    changes = {"status": move.status, "lease_owner": None, "heartbeat_at": None,
               "finished_at": now() if move.status in FINAL else None}
    if move.status == "succeeded":
        changes["result"] = outcome.result
    else:
        # A cancellation requested while the attempt ran wins over a retry or dead letter.
        requested = Job.cancel_requested_at.is_null(False)
        changes["status"] = pw.Case(None, [(requested, "cancelled")], move.status)
        changes["finished_at"] = pw.Case(None, [(requested, now())], changes["finished_at"])
        changes["dead_reason"] = pw.Case(None, [(requested, None)], move.dead_reason)
    if outcome.error is not None:
        changes["last_error"] = outcome.error
    if move.delay_s is not None:
        changes["run_at"] = now() + move.delay_s
    moved = list(Job.update(**changes).where(guard)
                 .returning(Job.status, Job.dead_reason, Job.run_at).execute())
    if not moved:
        return None
    ended = list(Attempt.update(status=outcome.status, finished_at=now(),
                                error_type=outcome.error_type,
                                error_message=outcome.error_message,
                                traceback=outcome.traceback)
                 .where(Attempt.job_id == job.id, Attempt.number == job.attempt,
                        Attempt.status == "running")
                 .returning(Attempt.started_at, Attempt.finished_at).execute())
    duration = ended[0].finished_at - ended[0].started_at if ended else None
    return Finished(job, outcome, moved[0].status, moved[0].dead_reason, moved[0].run_at,
                    duration)


def _announce(finished, event=None):
    """Count and log a committed transition: one line per job event."""
    job, outcome, status = finished.job, finished.outcome, finished.status
    labels = {"type": job.type, "queue": job.queue}
    tags = {"attempt": job.attempt, "worker_id": job.lease_owner, "status": status}
    if finished.duration_s is not None:
        metrics.observe_duration(finished.duration_s, **labels)
    if outcome.status == "succeeded":
        metrics.count("conveyor_jobs_succeeded", **labels)
        _event(logging.INFO, event or "succeeded", job,
               f"attempt {job.attempt} succeeded in {finished.duration_s or 0:.3f}s", **tags)
        return
    if outcome.status != "cancelled":
        metrics.count("conveyor_attempts_failed", outcome=outcome.status, **labels)
    ending = f"attempt {job.attempt} {outcome.status}: {outcome.error}"
    if status == "retryable":
        delay = max(0.0, finished.run_at - db_time())
        _event(logging.WARNING, event or "retrying", job, f"{ending}; retrying in {delay:.3f}s",
               delay_s=round(delay, 3), **tags)
    elif status == "dead":
        metrics.count("conveyor_jobs_dead", reason=finished.dead_reason, **labels)
        _event(logging.ERROR, event or "dead", job,
               f"{ending}; dead-lettered ({finished.dead_reason})", **tags)
    else:
        metrics.count("conveyor_jobs_cancelled", **labels)
        _event(logging.INFO, event or "cancelled", job, f"{ending}; job cancelled", **tags)


def _event(level, event, job, message, **tags):
    log.log(level, "job %d %s: %s", job.id, event, message,
            extra={"event": event, "job_id": job.id, "type": job.type, "queue": job.queue,
                   **tags})


# ---------------------------------------------------------------------------- steps

class LeaseLost(Exception):
    """This attempt no longer holds its job: another attempt may be running it."""


def load_step(job_id, name):
    """(True, result) when a step of this job already ran, else (False, None)."""
    step = Step.get_or_none(Step.job_id == job_id, Step.name == name)
    return (True, step.result) if step is not None else (False, None)


def save_step(job, name, result):
    """Store a step's result, only while job's lease is held; raise LeaseLost otherwise."""
    stored = list(Step.insert_from(
        Job.select(Job.id, pw.Value(name), pw.Value(json.dumps(result)), Job.attempt, now())
        .where(_holds(job)),
        [Step.job_id, Step.name, Step.result, Step.attempt, Step.created_at])
        .on_conflict(action="NOTHING").returning(Step.job_id).execute())
    if stored:
        return result
    found, existing = load_step(job.id, name)
    if not found or not lease_held(job):
        raise LeaseLost(f"job {job.id} attempt {job.attempt} lost its lease")
    return existing


# ---------------------------------------------------------------------------- workers

def register_worker(worker):
    Worker.insert(id=worker.id, supervisor_id=worker.supervisor_id, host=worker.host,
                  pid=worker.pid, queues=list(worker.queues), started_at=now(),
                  last_heartbeat_at=now()).on_conflict(action="NOTHING").execute()


def deregister_worker(worker_id):
    Worker.delete().where(Worker.id == worker_id).execute()


def forget_stale_workers(lease_s):
    """Drop registrations whose heartbeat is older than the lease (their host is gone)."""
    return Worker.delete().where(Worker.last_heartbeat_at < now() - lease_s).execute()


def live_workers(lease_s):
    """Workers heard from within the lease, each with current_job_id: the job it holds now
    (read from the jobs, so it is never staler than the lease itself)."""
    workers = list(Worker.select().where(Worker.last_heartbeat_at >= now() - lease_s)
                   .order_by(Worker.started_at))
    holding = dict(Job.select(Job.lease_owner, Job.id)
                   .where(Job.status == "running",
                          Job.lease_owner.in_([worker.id for worker in workers])).tuples())
    for worker in workers:
        worker.current_job_id = holding.get(worker.id)
    return workers


# ---------------------------------------------------------------------------- cancel, DLQ

def get_job(job_id, api_key_id=None):
    """The job, or NotFound (also for another API key's job: 404, not 403)."""
    if not isinstance(job_id, int) or not 0 < job_id < 2 ** 63:
        raise NotFound(f"job {job_id} not found")
    query = Job.select().where(Job.id == job_id)
    if api_key_id is not None:
        query = query.where(Job.api_key_id == api_key_id)
    job = query.first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def attempts_of(job_id):
    return list(Attempt.select().where(Attempt.job_id == job_id).order_by(Attempt.number))


def cancel(job_id, api_key_id=None):
    """Cancel a job: at once if it is waiting; a running one is flagged and its supervisor
    stops the worker. Returns (job, stopped_now)."""
    get_job(job_id, api_key_id)
    with db.atomic():
        stopped = (Job.update(status="cancelled", finished_at=now())
                   .where(Job.id == job_id, Job.status.in_(PENDING)).execute())
        flagged = not stopped and (
            Job.update(cancel_requested_at=pw.fn.COALESCE(Job.cancel_requested_at, now()))
            .where(Job.id == job_id, Job.status == "running").execute())
    job = get_job(job_id)
    if stopped:
        metrics.count("conveyor_jobs_cancelled", type=job.type, queue=job.queue)
        _event(logging.INFO, "cancelled", job, "cancelled before it ran", status=job.status)
        return job, True
    if flagged:
        _event(logging.INFO, "cancelling", job, f"attempt {job.attempt} is running; its "
               f"supervisor stops the worker", attempt=job.attempt, worker_id=job.lease_owner)
        return job, False
    raise Conflict(f"job {job_id} is {job.status} and cannot be cancelled")


def cancellations(worker_ids):
    """Running jobs of these workers whose cancellation was requested."""
    if not worker_ids:
        return []
    return list(Job.select(Job.id, Job.attempt, Job.lease_owner)
                .where(Job.status == "running", Job.lease_owner.in_(list(worker_ids)),
                       Job.cancel_requested_at.is_null(False)))


def dlq_retry(job_id):
    """Send a dead job back to `available` with a fresh attempt budget; history is kept."""
    with db.atomic():
        moved = (Job.update(status="available", run_at=now(), attempt_base=Job.attempt,
                            finished_at=None, dead_reason=None)
                 .where(Job.id == job_id, Job.status == "dead").execute())
    job = _dlq_result(job_id, moved)
    _event(logging.INFO, "requeued", job, "back from the dead-letter queue with "
           f"{job.max_attempts} fresh attempts", status=job.status)
    return job


def dlq_discard(job_id):
    """Discard a dead job: it becomes `cancelled`, its history kept until pruned."""
    with db.atomic():
        moved = (Job.update(status="cancelled", finished_at=now())
                 .where(Job.id == job_id, Job.status == "dead").execute())
    job = _dlq_result(job_id, moved)
    _event(logging.INFO, "discarded", job, "discarded from the dead-letter queue",
           status=job.status)
    return job


def _dlq_result(job_id, moved):
    job = get_job(job_id)
    if not moved:
        raise Conflict(f"job {job_id} is {job.status}, not in the dead-letter queue")
    return job


# ---------------------------------------------------------------------------- listing

def encode_cursor(position):
    """An opaque cursor for "the page after position" (an id, a name)."""
    return base64.urlsafe_b64encode(json.dumps({"after": position}).encode()).decode().rstrip("=")


def decode_cursor(cursor, kind=int):
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))["after"]
        if isinstance(value, kind) and not isinstance(value, bool) and (
                kind is not int or -2 ** 63 <= value < 2 ** 63):  # SQL integers are 64-bit
            return value
    except (ValueError, TypeError, KeyError, UnicodeError):
        pass
    raise Invalid("cursor is not one this server issued", ["cursor: invalid"])


def list_jobs(*, status=None, type=None, queue=None, api_key_id=None, limit=50, cursor=None):
    """A page of jobs, newest first: (jobs, next_cursor or None)."""
    if status is not None and status not in STATUSES:
        raise Invalid(f"unknown status {status!r}", [f"status: must be one of {', '.join(STATUSES)}"])
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"limit must be between 1 and {MAX_LIMIT}", ["limit: out of range"])
    query = Job.select()
    for column, value in ((Job.status, status), (Job.type, type), (Job.queue, queue),
                          (Job.api_key_id, api_key_id)):
        if value is not None:
            query = query.where(column == value)
    if cursor:
        query = query.where(Job.id < decode_cursor(cursor))
    page = list(query.order_by(Job.id.desc()).limit(limit + 1))
    next_cursor = encode_cursor(page[limit - 1].id) if len(page) > limit else None
    return page[:limit], next_cursor


def stats(lease_s):
    """Counts by queue and status, the age of the oldest available job, live workers."""
    queues, totals = {}, {}
    rows = (Job.select(Job.queue, Job.status, pw.fn.COUNT(Job.id).alias("n"))
            .group_by(Job.queue, Job.status).tuples())
    for queue, status, count in rows:
        queues.setdefault(queue, {})[status] = count
        totals[status] = totals.get(status, 0) + count
    oldest = (Job.select(pw.fn.MIN(Job.run_at)).where(Job.status.in_(PENDING), Job.run_at <= now())
              .scalar())
    age = max(0.0, db_time() - oldest) if oldest is not None else 0.0
    alive = Worker.select().where(Worker.last_heartbeat_at >= now() - lease_s).count()
    return {"queues": queues, "totals": totals, "oldest_available_age_s": round(age, 3),
            "workers_alive": alive}


def oldest_available_by_queue():
    """{queue: seconds its oldest due job has waited}, for queues with one."""
    current = db_time()
    rows = (Job.select(Job.queue, pw.fn.MIN(Job.run_at))
            .where(Job.status.in_(PENDING), Job.run_at <= now()).group_by(Job.queue).tuples())
    return {queue: round(max(0.0, current - oldest), 3) for queue, oldest in rows}


def prune(older_than_s, batch=1000):
    """Delete succeeded and cancelled jobs finished more than older_than_s ago, with their
    attempts and steps; dead jobs stay until retried or discarded. Returns the count."""
    cutoff = db_time() - older_than_s
    removed = 0
    while True:
        with db.atomic():
            ids = [j.id for j in Job.select(Job.id)
                   .where(Job.status.in_(("succeeded", "cancelled")), Job.finished_at < cutoff)
                   .limit(batch)]
            if not ids:
                return removed
            Attempt.delete().where(Attempt.job_id.in_(ids)).execute()
            Step.delete().where(Step.job_id.in_(ids)).execute()
            removed += Job.delete().where(Job.id.in_(ids),
                                          Job.status.in_(("succeeded", "cancelled"))).execute()
