"""Core job operations: the one owner of every job state change.

Enqueue, claim, heartbeat, finish (succeed, retry, dead-letter), reap, cancel, DLQ
retry/discard and prune live here; routes, CLI commands, the supervisor and its workers
only call them. Where a finished attempt leads (the retry policy) is decided in the pure
core/policy.py and applied here. Every UPDATE that moves a job names the state, attempt and
lease it expects, and "0 rows" means someone else owns the job now: the fencing of SPEC §4.
"""
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import Counter, namedtuple
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, NamedTuple, Optional

import peewee as pw
from jsonschema import Draft202012Validator

import handlers
from infra import metrics
from infra.config import settings
from core.errors import Conflict, InvalidJob, InvalidRequest, LeaseLost, NotFound, TooLarge
from core.policy import Outcome, next_transition, released_outcome, run_order
import models
from models import Attempt, Job, Step, Worker, db, is_postgres, now

PENDING = ("available", "scheduled", "retryable")
FINAL = ("succeeded", "dead", "cancelled")
STATUSES = ("scheduled", "available", "running", "succeeded", "retryable", "dead", "cancelled")
# `released`: claimed by a worker that died before it began the attempt; it does not count.
ATTEMPT_STATUSES = ("running", "succeeded", "failed", "timed_out", "crashed", "interrupted",
                    "cancelled", "released")
# "$(?!\n)": a JSON Schema pattern is a search, and "$" alone also matches before a final
# newline, which would let "default\n" through as a queue name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$(?!\n)"
MAX_LIMIT = 500
MAX_BATCH = 1000

log = logging.getLogger("conveyor.jobs")
# Made once: json.dumps with options makes a new encoder at every call.
_compact_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

# On PostgreSQL, stored jobs that can run now are announced on this channel, in the
# transaction that stores them; each supervisor LISTENs and wakes that many workers.
NOTIFY_CHANNEL = "conveyor_jobs"


def notify_payload(queue, count):
    """What a NOTIFY on NOTIFY_CHANNEL says: count new jobs available now in queue."""
    return f"{queue}:{count}"


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


def _property_check(schema):
    """is_valid for one property of SUBMISSION_SCHEMA: jsonschema's own type check where
    the schema names only a type, else its validator."""
    if schema.keys() == {"type"}:
        return partial(Draft202012Validator.TYPE_CHECKER.is_type, type=schema["type"])
    return Draft202012Validator(schema).is_valid


_property_checks = {name: _property_check(schema)
                    for name, schema in SUBMISSION_SCHEMA["properties"].items()}
_valid_values = {}  # (property, class, value) found valid; a batch repeats most of them
_MAX_VALID_VALUES = 10_000


class NewJob(NamedTuple):
    """A validated submission with every default resolved (the job's effective values)."""
    type: str
    payload: dict
    payload_json: str  # the payload as stored (compact JSON), encoded once when checked
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


# RFC 3339's date-time (section 5.6) exactly, with T and Z in capitals (SPEC §6: "nothing
# looser"); datetime.fromisoformat alone also takes spaces, week dates, +0000 and more.
# The offset is optional here only to say when it is what is missing.
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"(?P<offset>Z|[+-][0-9]{2}:[0-9]{2})?")


def parse_time(text, name="run_at"):
    """An RFC 3339 date-time with an offset, as UTC epoch seconds; InvalidJob naming `name`."""
    problem = f"{name} is not an RFC 3339 time with an offset (e.g. 2030-01-01T09:00:00Z)"
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidJob(f"{problem}: {text!r}", [f"{name}: not an RFC 3339 date-time"])
    if match["offset"] is None:
        raise InvalidJob(f"{name} needs a UTC offset (e.g. 2030-01-01T09:00:00Z): {text!r}",
                         [f"{name}: no UTC offset"])
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:  # each field has its digits, but a 13th month, a 25th hour...
        raise InvalidJob(f"{problem}: {text!r}", [f"{name}: not a valid date and time"]) from None
    try:
        return parsed.astimezone(timezone.utc).timestamp()
    except OverflowError:  # in UTC it falls outside years 1 to 9999, so it cannot be shown
        raise InvalidJob(f"{name} is out of range: {text!r}", [f"{name}: out of range"]) from None


def request_fingerprint(body):
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_submission(body, idempotency_key=None):
    """Check one submission and resolve its defaults; raise InvalidJob or TooLarge."""
    if not isinstance(body, dict):
        raise InvalidJob("a job must be a JSON object", ["(job): must be an object"])
    payload = body.get("payload", {})
    unproven = [item for item in body.items() if not _proven(item)]
    try:
        # JSON Schema's "number" lets NaN through (a CLI float, a parsed 1e999 is infinity):
        # it would break the NOT NULL columns, every timeout and every JSON reader. (A value
        # proven valid before passed this check then.)
        payload_json = _compact_json.encode(payload)
        rest = [value for name, value in unproven if name != "payload"]
        if rest:
            _compact_json.encode(rest)
    except ValueError:
        raise InvalidJob("the job holds NaN or Infinity, which are not JSON numbers",
                         ["(job): NaN and Infinity are not allowed"]) from None
    if "type" not in body or not _fits_schema(unproven):
        errors = [f"{'/'.join(map(str, e.absolute_path)) or '(job)'}: {e.message}"
                  for e in _submission_validator.iter_errors(body)]
        if errors:
            raise InvalidJob("the job is not valid", errors)
    if "run_at" in body and "delay_s" in body:
        raise InvalidJob("give run_at or delay_s, not both", ["run_at: not allowed with delay_s"])
    handler = handlers.get(body["type"])
    if handler is None:
        raise InvalidJob(f"unknown job type {body['type']!r}",
                         [f"type: {body['type']!r} is not registered"])
    size = len(payload_json)  # ASCII: json.dumps escapes everything else
    limit = settings().max_payload_bytes
    if size > limit:
        raise TooLarge(f"the payload is {size} bytes, over the limit of {limit}")
    payload_errors = handler.payload_errors(payload)
    if payload_errors:
        raise InvalidJob(f"the payload does not match the schema of {handler.name!r}",
                         payload_errors)
    given = job_defaults(handler)
    backoff = body.get("backoff", {})
    base = _first(backoff.get("base_s"), given.backoff_base_s)
    cap = _first(backoff.get("max_s"), given.backoff_max_s)
    if cap < base:
        raise InvalidJob("backoff max_s must be at least base_s", ["backoff/max_s: below base_s"])
    key = body.get("idempotency_key", idempotency_key)
    return NewJob(
        type=handler.name,
        payload=payload,
        queue=_first(body.get("queue"), given.queue),
        priority=int(body.get("priority", 0)),
        run_at=parse_time(body["run_at"]) if "run_at" in body else None,
        delay_s=float(body.get("delay_s", 0)),
        max_attempts=int(_first(body.get("max_attempts"), given.max_attempts)),
        timeout_s=float(_first(body.get("timeout_s"), given.timeout_s)),
        backoff_base_s=float(base),
        backoff_max_s=float(cap),
        idempotency_key=key,
        request_hash=request_fingerprint(body) if key is not None else None,
        payload_json=payload_json,
    )


class JobDefaults(NamedTuple):
    """What a job of one type gets unless it says otherwise."""
    queue: str
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float


def job_defaults(handler):
    """The handler's own options, else the settings' defaults."""
    conf = settings()
    return JobDefaults(
        queue=_first(handler.queue, "default"),
        max_attempts=_first(handler.max_attempts, conf.default_max_attempts),
        timeout_s=_first(handler.timeout_s, conf.default_timeout_s),
        backoff_base_s=_first(handler.backoff_base_s, conf.backoff_base_s),
        backoff_max_s=_first(handler.backoff_max_s, conf.backoff_max_s))


# SUBMISSION_SCHEMA checks each property on its own, so a submission fits it when it has a
# type and each of its properties fits; a value found valid once (hashable: not an object or
# a list) need not be checked again, and a batch repeats its types and queues.

_UNREMEMBERED = (dict, list)  # a payload, a backoff: not hashable, checked every time


def _proven(item):
    """Whether this (property, value) was found valid before."""
    name, value = item
    kind = value.__class__  # True == 1 and 1.0 == 1, but they are not equally valid
    if kind in _UNREMEMBERED:
        return False
    try:
        return (name, kind, value) in _valid_values
    except TypeError:  # not from JSON (a tuple holding a list, say): invalid, said later
        return False


def _fits_schema(unproven):
    """Whether these (property, value) all fit SUBMISSION_SCHEMA, as its validator says."""
    for name, value in unproven:
        check = _property_checks.get(name)
        if check is None or not check(value):
            return False  # additionalProperties, or an invalid value
        if value.__class__ in _UNREMEMBERED:
            continue
        if len(_valid_values) >= _MAX_VALID_VALUES:
            forget_valid_values()
        _valid_values[(name, value.__class__, value)] = True
    return True


def forget_valid_values():
    """Forget the values found valid before: the next submissions are checked in full (the
    cache empties itself when full; a test starts from it empty)."""
    _valid_values.clear()


def _first(*values):
    for value in values:
        if value is not None:
            return value


# ---------------------------------------------------------------------------- enqueue

def db_time():
    """The database's clock, in epoch seconds (SQLite lives on this host: its clock is ours)."""
    if is_postgres():
        return db.execute_sql("SELECT extract(epoch from clock_timestamp())::float8").fetchone()[0]
    return time.time()


# A job as enqueue answers it: the value of each column of `jobs`, as stored. (Model
# instances cost more to make and to read than the rest of a batch's answer.)
StoredJob = namedtuple("StoredJob", Job._meta.sorted_field_names)


def enqueue(new_jobs, api_key_id=None):
    """Insert jobs in one transaction; return [(StoredJob, created)] in the order given.

    A job with an idempotency key that this API key already used returns the existing
    job (created=False) when the request matches, and raises Conflict when it differs;
    the unique index decides, so concurrent identical requests make one job. On
    PostgreSQL the same statement announces the jobs that can run now (NOTIFY_CHANNEL).
    """
    if not new_jobs:
        return []
    keyed = any(new.idempotency_key is not None for new in new_jobs)
    chunks = list(_insert_chunks(new_jobs))
    insert = _insert_postgres if is_postgres() else _insert_sqlite
    # One statement is atomic by itself; a used key takes a second one (to read the
    # job it names), and a conflict must undo the first.
    with db.atomic() if keyed or len(chunks) > 1 else contextlib.nullcontext():
        inserted = [row for chunk in chunks for row in insert(chunk, api_key_id, keyed)]
        stored = _stored(new_jobs, inserted, api_key_id)
    created = [job for job, was_created in stored if was_created]
    for (type_, queue), count in Counter((job.type, job.queue) for job in created).items():
        metrics.count("conveyor_jobs_submitted", count, type=type_, queue=queue)
    if log.isEnabledFor(logging.INFO):
        for job in created:
            _event(logging.INFO, "submitted", job,
                   f"{job.status}, run at {job.run_at:.3f}" if job.status == "scheduled"
                   else job.status)
    return stored


# Payload bytes one insert statement carries at most: a batch of large payloads goes in
# several (one transaction), so that the driver's copies of a statement and libpq's send
# buffer, which keeps its largest size, stay small however large the batch.
INSERT_CHUNK_BYTES = 1 << 20


def _insert_chunks(new_jobs):
    """new_jobs in consecutive runs of at most INSERT_CHUNK_BYTES of payload (or one job)."""
    chunk, size = [], 0
    for new in new_jobs:
        if chunk and size + len(new.payload_json) > INSERT_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(new)
        size += len(new.payload_json)
    yield chunk


# What the insert sets; the other columns of a new job hold their defaults (_UNSET).
_INSERTED = ("type", "queue", "payload", "priority", "run_at", "status", "max_attempts",
             "timeout_s", "backoff_base_s", "backoff_max_s", "idempotency_key", "request_hash",
             "api_key_id", "created_at")
_UNSET = {"attempt": 0, "attempt_base": 0, "result": None, "last_error": None,
          "dead_reason": None, "started_at": None, "finished_at": None, "lease_owner": None,
          "heartbeat_at": None, "cancel_requested_at": None}
_RETURNED = "id, idempotency_key, status, run_at, created_at"

# What each job of _PG_INSERT's JSON document holds, in order (arrays: PostgreSQL reads
# them much faster than objects).
_GIVEN = (("type", "text"), ("queue", "text"), ("payload", "text"), ("priority", "int"),
          ("run_at", "float8"), ("delay_s", "float8"), ("max_attempts", "int"),
          ("timeout_s", "float8"), ("backoff_base_s", "float8"), ("backoff_max_s", "float8"),
          ("idempotency_key", "text"), ("request_hash", "text"))


def _pg_insert(keyed):
    """One statement: the clock read once, the jobs given as one JSON document, a used
    idempotency key skipped (ON CONFLICT, only where there are keys: it costs), and one
    NOTIFY per queue that got jobs it can run now, sent at commit. The payload of a NOTIFY
    is notify_payload(queue, count), in SQL."""
    given = ", ".join(f"(job->>{i})::{kind} AS {name}" for i, (name, kind) in enumerate(_GIVEN))
    return f"""
WITH clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now),
given AS (SELECT {given} FROM json_array_elements(%s) AS job),
new AS (
    INSERT INTO jobs ({", ".join(_INSERTED)})
    SELECT v.type, v.queue, v.payload, v.priority, COALESCE(v.run_at, clock.now + v.delay_s),
           CASE WHEN COALESCE(v.run_at, clock.now + v.delay_s) > clock.now
                THEN 'scheduled' ELSE 'available' END,
           v.max_attempts, v.timeout_s, v.backoff_base_s, v.backoff_max_s, v.idempotency_key,
           v.request_hash, %s::bigint, clock.now
    FROM given AS v, clock
    {"ON CONFLICT DO NOTHING" if keyed else ""}
    RETURNING {_RETURNED}, queue),
announced AS (
    SELECT pg_notify(%s, queue || ':' || count(*)) FROM new
    WHERE status = 'available' GROUP BY queue)
SELECT {_RETURNED} FROM new, (SELECT count(*) FROM announced) AS notified"""


_PG_INSERT = {keyed: _pg_insert(keyed) for keyed in (False, True)}


def _insert_postgres(new_jobs, api_key_id, keyed):
    """Insert on PostgreSQL; returns (id, idempotency_key, status, run_at, created_at) of
    each row stored, by id (the order given)."""
    given = _compact_json.encode([
        (new.type, new.queue, new.payload_json, new.priority, new.run_at, new.delay_s,
         new.max_attempts, new.timeout_s, new.backoff_base_s, new.backoff_max_s,
         new.idempotency_key, new.request_hash) for new in new_jobs])
    cursor = models.execute(_PG_INSERT[keyed], (given, api_key_id, NOTIFY_CHANNEL))
    return sorted(cursor.fetchall())


def _insert_sqlite(new_jobs, api_key_id, keyed):
    """Insert on SQLite (which has no NOTIFY); returns what _insert_postgres does."""
    current = time.time()  # SQLite lives on this host: its clock is ours
    values = []
    for new in new_jobs:
        run_at = new.run_at if new.run_at is not None else current + new.delay_s
        values += (new.type, new.queue, new.payload_json, new.priority, run_at,
                   "scheduled" if run_at > current else "available", new.max_attempts,
                   new.timeout_s, new.backoff_base_s, new.backoff_max_s, new.idempotency_key,
                   new.request_hash, api_key_id, current)
    row = f"({', '.join('?' * len(_INSERTED))})"
    cursor = db.execute_sql(
        f"INSERT INTO jobs ({', '.join(_INSERTED)}) VALUES {', '.join([row] * len(new_jobs))} "
        f"{'ON CONFLICT DO NOTHING' if keyed else ''} RETURNING {_RETURNED}", values)
    return sorted(cursor.fetchall())


def _stored(new_jobs, inserted, api_key_id):
    """[(job, created)] in the order given. The rows inserted without a key are the jobs
    without one, in order; a key's row is the first job with that key. Any other job's key
    was used already: it names the job it made, which must come from an equal request."""
    plain = iter([row for row in inserted if row[1] is None])
    by_key = {row[1]: row for row in inserted if row[1] is not None}
    stored, used = [], []
    for index, new in enumerate(new_jobs):
        row = next(plain) if new.idempotency_key is None else by_key.pop(new.idempotency_key, None)
        stored.append((None, False) if row is None else (_new_job(new, row, api_key_id), True))
        if row is None:
            used.append(index)
    if used:
        existing = {job.idempotency_key: job for job in Job.select().where(
            pw.fn.COALESCE(Job.api_key_id, 0) == (api_key_id or 0),
            Job.idempotency_key.in_(list({new_jobs[i].idempotency_key for i in used})))}
        conflicts = []
        for index in used:
            job = existing.get(new_jobs[index].idempotency_key)
            if job is None:
                raise Conflict("the job could not be stored; try again")
            if job.request_hash != new_jobs[index].request_hash:
                conflicts.append(index)
            stored[index] = (StoredJob(**job.__data__), False)
        if conflicts:
            raise Conflict("an idempotency key was already used for a different job",
                           [f"{i}: idempotency key {new_jobs[i].idempotency_key!r} was used "
                            f"for a different request (job {stored[i][0].id})" for i in conflicts])
    return stored


def _new_job(new, row, api_key_id):
    """The job as stored, from what was sent and what the insert returned (no read-back)."""
    job_id, key, status, run_at, created_at = row
    return StoredJob(
        **_UNSET, id=job_id, type=new.type, queue=new.queue, payload=new.payload,
        priority=new.priority, run_at=run_at, max_attempts=new.max_attempts,
        timeout_s=new.timeout_s, backoff_base_s=new.backoff_base_s,
        backoff_max_s=new.backoff_max_s, status=status, idempotency_key=key,
        request_hash=new.request_hash, api_key_id=api_key_id, created_at=created_at)


# ---------------------------------------------------------------------------- the worker's step

# Literal, not bound: SQLite uses a partial index only when the query's condition spells out
# the index's own predicate.
PENDING_SQL = "status IN (%s)" % ", ".join(f"'{status}'" for status in PENDING)
_PENDING = pw.SQL(PENDING_SQL)


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    supervisor_id: str
    host: str
    pid: int
    queues: tuple = ()


class Claimed(NamedTuple):
    """A job as its worker holds it: what the handler, the retry policy and the lease need.
    started_at is the database's clock when the attempt was claimed."""
    id: int
    type: str
    queue: str
    payload: dict
    priority: int
    run_at: float
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float
    attempt: int
    attempt_base: int
    idempotency_key: Optional[str]
    started_at: float
    cancel_requested_at: Optional[float]
    lease_owner: str


CLAIMED_COLUMNS = ", ".join(Claimed._fields)


class Report(NamedTuple):
    """A finished attempt to record: started_at/finished_at are its times on the database's
    clock (None: the time of recording)."""
    job: Claimed
    outcome: "Outcome"
    started_at: Optional[float] = None
    finished_at: Optional[float] = None


def claim(worker, limit=1):
    """Start up to `limit` due jobs for `worker`; returns them (as Claimed)."""
    return step(worker, (), limit)[0]


def report(job, outcome):
    """A worker reports its attempt's outcome. False when its lease was lost: the outcome
    is refused, the attempt is marked fenced and the job is left as it is."""
    return step(None, [Report(job, outcome)], 0)[1][0]


def step(worker, reports=(), limit=1):
    """Record the outcomes of finished attempts and start up to `limit` new ones, in one
    round trip on PostgreSQL (one statement) and one transaction on SQLite.

    Each outcome is accepted only from the lease that holds its job (fencing); a refused
    one marks its attempt fenced. Returns (claimed jobs, [accepted?] per report).
    """
    rows = [_reported(r) for r in reports]
    if not rows and not limit:
        return [], []
    if not rows and not is_postgres() and not _any_due(worker.queues):
        return [], []  # spare SQLite's single write lock when there is nothing to take
    if is_postgres():
        claimed, moved, refused = _step_postgres(worker, rows, limit)
    else:
        claimed, moved, refused = _step_sqlite(worker, rows, limit)
    accepted = []
    for report_, row in zip(reports, rows):
        job, outcome = report_.job, report_.outcome
        if job.id in moved:
            status, dead_reason, _, finished_at = moved[job.id]
            started = report_.started_at if report_.started_at is not None else job.started_at
            ended = report_.finished_at if report_.finished_at is not None else finished_at
            _announce(Finished(job, outcome, status, dead_reason, row["delay_s"],
                               None if ended is None else ended - started))
        elif job.id in refused:
            _event(logging.WARNING, "refused", job,
                   f"late outcome refused: attempt {job.attempt} {outcome.status} after its "
                   f"lease was lost", attempt=job.attempt, worker_id=job.lease_owner)
        accepted.append(job.id not in refused)  # neither: our own earlier report committed
    claimed.sort(key=run_order)  # the order the worker runs them in
    for job in claimed:
        _event(logging.INFO, "started", job, f"attempt {job.attempt} on {worker.id}",
               attempt=job.attempt, worker_id=worker.id)
    return claimed, accepted


def _reported(report_):
    """The values one outcome writes: the retry policy decided here, fencing in SQL."""
    job, outcome = report_.job, report_.outcome
    move = next_transition(job, outcome)
    result = None if outcome.result is None or move.status != "succeeded" else \
        json.dumps(outcome.result, separators=(",", ":"))
    return {"id": job.id, "attempt": job.attempt, "lease_owner": job.lease_owner,
            "status": move.status, "delay_s": move.delay_s, "result": result,
            "last_error": None if move.refund else outcome.error, "dead_reason": move.dead_reason,
            "attempt_status": outcome.status, "error_type": outcome.error_type,
            "error_message": outcome.error_message, "traceback": outcome.traceback,
            "started_at": report_.started_at, "finished_at": report_.finished_at,
            "refund": int(move.refund)}


_REPORTED_TYPES = (("id", "bigint"), ("attempt", "int"), ("lease_owner", "text"),
                   ("status", "text"), ("delay_s", "float8"), ("result", "text"),
                   ("last_error", "text"), ("dead_reason", "text"), ("attempt_status", "text"),
                   ("error_type", "text"), ("error_message", "text"), ("traceback", "text"),
                   ("started_at", "float8"), ("finished_at", "float8"), ("refund", "int"))
_REPORTED_KINDS = dict(_REPORTED_TYPES)


def _finish_assignments(value, column, now_sql):
    """SET clauses moving a running job by its reported outcome; value(name) is how the
    statement refers to a reported field, column(name) to the job's own. A cancellation
    requested while the attempt ran wins over a retry or a dead letter; a refunded
    attempt (released: it never began) keeps its number but gives its budget back."""
    status = value("status")
    ended = f"COALESCE({value('finished_at')}, {now_sql})"  # when the attempt ended
    cancelled = f"({column('cancel_requested_at')} IS NOT NULL AND {status} <> 'succeeded')"
    return f"""status = CASE WHEN {cancelled} THEN 'cancelled' ELSE {status} END,
        result = CASE WHEN {status} = 'succeeded' THEN {value('result')} ELSE {column('result')} END,
        last_error = COALESCE({value('last_error')}, {column('last_error')}),
        dead_reason = CASE WHEN {cancelled} THEN NULL ELSE {value('dead_reason')} END,
        run_at = CASE WHEN {value('delay_s')} IS NULL THEN {column('run_at')}
                      ELSE {ended} + {value('delay_s')} END,
        finished_at = CASE WHEN {cancelled} OR {status} IN ('succeeded', 'dead', 'cancelled')
                           THEN {ended} END,
        attempt_base = {column('attempt_base')} + {value('refund')},
        lease_owner = NULL, heartbeat_at = NULL"""


# One instant for the whole statement, read from the clock once the statement runs, not
# when its transaction began (now()): a claim may wait (a lock, the scheduler) between the
# two, and see a release that committed meanwhile; the attempt it starts must begin after
# the released one was recorded finished.
_PG_CLOCK = "clock AS MATERIALIZED (SELECT extract(epoch from clock_timestamp())::float8 AS now)"
_PG_NOW = "(SELECT now FROM clock)"
_pg_statements = {}


def _pg_step_sql(reports, claiming, by_queue):
    """The one statement of a PostgreSQL step (cached by its shape)."""
    shape = (reports, claiming, by_queue)
    if shape in _pg_statements:
        return _pg_statements[shape]
    ctes, selects = [], []
    if claiming:
        queue_filter = "AND queue = ANY(%s)" if by_queue else ""
        ctes += [
            f"""next AS (
                SELECT id FROM jobs
                WHERE {PENDING_SQL} AND run_at <= {_PG_NOW} {queue_filter}
                ORDER BY priority, run_at, id LIMIT %s FOR UPDATE SKIP LOCKED)""",
            f"""claimed AS (
                UPDATE jobs SET status = 'running', attempt = jobs.attempt + 1,
                                lease_owner = %s, heartbeat_at = {_PG_NOW}, started_at = {_PG_NOW}
                FROM next WHERE jobs.id = next.id
                RETURNING {', '.join(f'jobs.{c}' for c in Claimed._fields)})""",
            """started AS (
                INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at)
                SELECT id, attempt, 'running', lease_owner, %s, %s, started_at FROM claimed)""",
        ]
        selects.append(f"SELECT 'claimed' AS kind, {CLAIMED_COLUMNS}, NULL::text AS new_status, "
                       f"NULL::text AS new_dead_reason, NULL::float8 AS finished_at FROM claimed")
    if reports:
        row = "(" + ", ".join(f"%s::{kind}" for _, kind in _REPORTED_TYPES) + ")"
        columns = ", ".join(name for name, _ in _REPORTED_TYPES)
        ctes[:0] = [
            f"reported ({columns}) AS (VALUES {', '.join([row] * reports)})",
            f"""moved AS (
                UPDATE jobs SET {_finish_assignments(lambda name: f'r.{name}',
                                                     lambda name: f'jobs.{name}', _PG_NOW)}
                FROM reported r
                WHERE jobs.id = r.id AND jobs.status = 'running' AND jobs.attempt = r.attempt
                  AND jobs.lease_owner = r.lease_owner
                RETURNING jobs.id, jobs.status, jobs.dead_reason, jobs.run_at, jobs.finished_at)""",
            f"""ended AS (
                UPDATE attempts SET status = r.attempt_status,
                    started_at = COALESCE(r.started_at, attempts.started_at),
                    finished_at = COALESCE(r.finished_at, {_PG_NOW}),
                    error_type = r.error_type, error_message = r.error_message,
                    traceback = r.traceback
                FROM reported r JOIN moved m ON m.id = r.id
                WHERE attempts.job_id = r.id AND attempts.number = r.attempt
                  AND attempts.status = 'running')""",
            """refused AS (
                UPDATE attempts SET fenced = TRUE
                FROM reported r
                WHERE attempts.job_id = r.id AND attempts.number = r.attempt
                  AND attempts.status <> r.attempt_status
                  AND NOT EXISTS (SELECT 1 FROM moved m WHERE m.id = r.id)
                RETURNING attempts.job_id)""",
        ]
        blanks = ", ".join(f"NULL AS {c}" for c in Claimed._fields[1:])
        selects += [
            f"SELECT 'moved', id, {blanks}, status, dead_reason, finished_at FROM moved",
            f"SELECT 'refused', job_id, {blanks}, NULL, NULL, NULL FROM refused",
        ]
        selects[-2] = selects[-2].replace("NULL AS run_at", "run_at AS run_at")
    sql = "WITH " + ",\n".join([_PG_CLOCK, *ctes]) + "\n" + "\nUNION ALL\n".join(selects)
    _pg_statements[shape] = sql
    return sql


def _step_postgres(worker, rows, limit):
    params = [row[name] for row in rows for name, _ in _REPORTED_TYPES]
    if limit:
        params += _pg_claim_params(worker, limit)
    cursor = models.execute(_pg_step_sql(len(rows), bool(limit), bool(limit and worker.queues)),
                            params)
    claimed, moved, refused = [], {}, set()
    for kind, *values in cursor.fetchall():
        if kind == "claimed":
            claimed.append(_claimed(values[:len(Claimed._fields)]))
        elif kind == "moved":
            moved[values[0]] = (values[-3], values[-2], values[5], values[-1])
        else:
            refused.add(values[0])
    return claimed, moved, refused


def _pg_claim_params(worker, limit):
    return ([list(worker.queues)] if worker.queues else []) + [
        limit, worker.id, worker.host, worker.pid]


def _claimed(values):
    job = Claimed(*values)
    return job._replace(payload=json.loads(job.payload))


_SQLITE_MOVE = f"""UPDATE jobs SET {_finish_assignments(lambda name: f':{name}', str, ':now')}
    WHERE id = :id AND status = 'running' AND attempt = :attempt AND lease_owner = :lease_owner
    RETURNING status, dead_reason, run_at, finished_at"""
_SQLITE_END = """UPDATE attempts SET status = :attempt_status,
        started_at = COALESCE(:started_at, started_at), finished_at = COALESCE(:finished_at, :now),
        error_type = :error_type, error_message = :error_message, traceback = :traceback
    WHERE job_id = :id AND number = :attempt AND status = 'running'"""
_SQLITE_REFUSE = """UPDATE attempts SET fenced = 1
    WHERE job_id = :id AND number = :attempt AND status <> :attempt_status RETURNING job_id"""
_SQLITE_CLAIM = f"""UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = ?,
        heartbeat_at = ?, started_at = ?
    WHERE id IN (SELECT id FROM jobs WHERE {PENDING_SQL} AND run_at <= ? {{queues}}
                 ORDER BY priority, run_at, id LIMIT ?)
    RETURNING {CLAIMED_COLUMNS}"""


def _step_sqlite(worker, rows, limit):
    claimed, moved, refused = [], {}, set()
    with db.atomic():  # BEGIN IMMEDIATE: the write lock first, so no upgrade can fail
        current = time.time()  # SQLite lives on this host: its clock is ours
        for row in rows:
            values = {**row, "now": current}
            found = db.execute_sql(_SQLITE_MOVE, values).fetchone()
            if found:
                moved[row["id"]] = found
                db.execute_sql(_SQLITE_END, values)
            elif db.execute_sql(_SQLITE_REFUSE, values).fetchone():
                refused.add(row["id"])
        if limit:
            cursor = db.execute_sql(*_sqlite_claim(worker, limit, current))
            claimed = [_claimed(values) for values in cursor.fetchall()]
            if claimed:
                Attempt.insert_many([{
                    "job_id": job.id, "number": job.attempt, "status": "running",
                    "worker_id": worker.id, "host": worker.host, "pid": worker.pid,
                    "started_at": job.started_at} for job in claimed]).execute()
    return claimed, moved, refused


def _sqlite_claim(worker, limit, now):
    queues = f"AND queue IN ({', '.join('?' * len(worker.queues))})" if worker.queues else ""
    return (_SQLITE_CLAIM.format(queues=queues),
            [worker.id, now, now, now, *worker.queues, limit])


def claim_statement(worker, limit=1):
    """(sql, params): the statement `claim(worker, limit)` runs on the open database, as it
    runs it, for what must see it whole: the plan tests (EXPLAIN), and the fault tests that
    pick its prepared name out of the wire (models.statement_name)."""
    if is_postgres():
        return _pg_step_sql(0, True, bool(worker.queues)), _pg_claim_params(worker, limit)
    return _sqlite_claim(worker, limit, time.time())


def _any_due(queues):
    """Whether _step_sqlite would find a job to claim: by its clock, time.time() (SQLite's
    own 'now' is cut to the millisecond, so a job stored due could look not due yet)."""
    query = Job.select(Job.id).where(_PENDING, Job.run_at <= time.time())
    if queues:
        query = query.where(Job.queue.in_(queues))
    return query.exists()


def stage_due():
    """Mark scheduled and retryable jobs whose time has come `available` (claim takes them
    either way; this keeps the stored status true for readers)."""
    return (Job.update(status="available")
            .where(pw.SQL("status IN ('scheduled', 'retryable')"), Job.run_at <= now())
            .execute())


# ---------------------------------------------------------------------------- heartbeat

def heartbeat(worker, job_ids=()):
    """Renew the worker's registration and the leases it holds on these jobs; returns the
    ids of those whose lease it still holds.

    Only the jobs the worker knows it holds: a claim whose answer was lost (the connection
    broke after the commit) leaves jobs under its lease that it will never run, and those
    must expire and be reaped, not be kept alive forever."""
    with db.atomic():
        if not Worker.update(last_heartbeat_at=now()).where(Worker.id == worker.id).execute():
            register_worker(worker)
        if not job_ids:
            return set()
        renewed = (Job.update(heartbeat_at=now())
                   .where(Job.id.in_(list(job_ids)), Job.status == "running",
                          Job.lease_owner == worker.id)
                   .returning(Job.id).execute())
        return {row.id for row in renewed}


def _holds(job):
    """The SQL condition "job is still running this attempt under this lease"."""
    return ((Job.id == job.id) & (Job.status == "running")
            & (Job.attempt == job.attempt) & (Job.lease_owner == job.lease_owner))


def lease_held(job):
    return Job.select(Job.id).where(_holds(job)).exists()


# ---------------------------------------------------------------------------- outcomes

def end_attempts(worker_id, outcome, running_job_id=None):
    """A supervisor ends what its dead or killed worker held: the attempt whose handler was
    running (running_job_id, from the worker's slot) ends with outcome; every other job the
    worker had claimed never began, and is released. Returns the jobs ended."""
    held = list(Job.select().where(Job.status == "running", Job.lease_owner == worker_id))
    released = released_outcome(f"its worker {worker_id} ended first ({outcome.error})")
    return _end_held(held, lambda job: outcome if job.id == running_job_id else released)


def release(worker_id, job_ids, why):
    """A worker gives back jobs it claimed and will not begin; returns the jobs released."""
    held = list(Job.select().where(Job.id.in_(list(job_ids)), Job.status == "running",
                                   Job.lease_owner == worker_id))
    outcome = released_outcome(why)
    return _end_held(held, lambda job: outcome)


def _end_held(held, outcome_of):
    ended = []
    for job in held:
        with db.atomic():
            finished = _finish(job, outcome_of(job))
        if finished is not None:
            ended.append(finished)
    _announce_all(ended)
    return [finished.job for finished in ended]


def _announce_all(ended, event=None):
    """Count and log committed transitions, and wake idle workers (on PostgreSQL, every
    supervisor's) for the jobs released among them."""
    for finished in ended:
        _announce(finished, event)
    released = Counter(f.job.queue for f in ended if f.outcome.status == "released")
    if released and is_postgres():
        for queue, count in released.items():
            db.execute_sql("SELECT pg_notify(%s, %s)",
                           (NOTIFY_CHANNEL, notify_payload(queue, count)))


def reap_expired(lease_s, limit=100):
    """Record the attempts of workers whose heartbeat is older than the lease; any process
    may call this. Such a worker was lost with everything it held, and nobody saw how far
    through its claim it got: the first job in its run order is charged the attempt
    (`crashed`, as if its handler was running), the rest are released. A worker's claim is
    taken whole, its rows locked in one transaction, so two reapers cannot each charge a
    different job. The guard re-checks staleness, so a heartbeat that lands first wins.
    Returns the jobs ended (crashed and released)."""
    owners = (Job.select(Job.lease_owner)
              .where(Job.status == "running", Job.heartbeat_at < now() - lease_s)
              .distinct().limit(limit).tuples())
    crashed = Outcome("crashed", error_type="LeaseExpired",
                      error_message=f"no heartbeat for over {lease_s:g}s: worker or host lost")
    released = released_outcome(f"no heartbeat for over {lease_s:g}s, and an earlier job of "
                                f"the same claim was charged the attempt")
    reaped = []
    for (owner,) in list(owners):
        ended = []
        with db.atomic():
            held = sorted(_lock_stale_claim(owner, lease_s), key=run_order)
            for job in held:
                finished = _finish(job, crashed if job is held[0] else released, lease_s)
                if finished is not None:
                    ended.append(finished)
        for finished in ended:
            if finished.outcome is crashed:
                metrics.count("conveyor_attempts_reaped", type=finished.job.type,
                              queue=finished.job.queue)
        _announce_all(ended, event="reaped")
        reaped += [finished.job for finished in ended]
    return reaped


def _lock_stale_claim(owner, lease_s):
    """The stale running jobs of one worker, locked; [] when another session holds any of
    them (a reaper, or a cut-off session until the server ends it): a later round retries
    instead of deciding from part of the claim, or stalling on it."""
    stale = (Job.select().where(Job.lease_owner == owner, Job.status == "running",
                                Job.heartbeat_at < now() - lease_s))
    if not is_postgres():
        return list(stale)  # BEGIN IMMEDIATE: this transaction is the only writer
    locked = list(stale.for_update("FOR UPDATE SKIP LOCKED"))
    return locked if len(locked) == stale.count() else []


@dataclass(frozen=True)
class Finished:
    """What _finish did to a job: the outcome it recorded and where the job went."""
    job: Any
    outcome: Outcome
    status: str
    dead_reason: Optional[str]
    retry_in_s: Optional[float]  # the policy's delay, counted from the attempt's end
    duration_s: Optional[float]


def _finish(job, outcome, stale_after_s=None):
    """Apply the retry policy to a job still running this attempt under this lease (and,
    with stale_after_s, whose heartbeat is older than that); None if another process owns
    the job now, else what was done (to announce once the transaction commits). The job
    moves by the same SET clauses as a worker's report."""
    values = {**_reported(Report(job, outcome)), "stale_after_s": stale_after_s}

    def named(name):  # a named parameter, in the driver's style
        return f"%({name})s" if is_postgres() else f":{name}"

    clock = now().sql
    assignments = _finish_assignments(
        lambda name: f"CAST({named(name)} AS {_REPORTED_KINDS[name]})", str, clock)
    sql = (f"UPDATE jobs SET {assignments} WHERE id = {named('id')} AND status = 'running' "
           f"AND attempt = {named('attempt')} AND lease_owner = {named('lease_owner')}")
    if stale_after_s is not None:
        # The guard re-checks staleness, so a heartbeat that lands first wins.
        sql += f" AND heartbeat_at < {clock} - {named('stale_after_s')}"
        if is_postgres():
            # A row another session holds locked (one cut off or stalled mid-transaction,
            # until the server ends it) waits for a later round instead of stalling us.
            sql += f" AND id IN (SELECT id FROM jobs WHERE id = {named('id')} FOR UPDATE SKIP LOCKED)"
    moved = db.execute_sql(sql + " RETURNING status, dead_reason", values).fetchall()
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
    [(status, dead_reason)] = moved
    return Finished(job, outcome, status, dead_reason, values["delay_s"], duration)


def _announce(finished, event=None):
    """Count and log a committed transition: one line per job event."""
    job, outcome, status = finished.job, finished.outcome, finished.status
    labels = {"type": job.type, "queue": job.queue}
    tags = {"attempt": job.attempt, "worker_id": job.lease_owner, "status": status}
    if outcome.status == "released":  # it never ran: no duration, no failure
        metrics.count("conveyor_attempts_released", **labels)
        if status == "cancelled":
            metrics.count("conveyor_jobs_cancelled", **labels)
        _event(logging.INFO, "released", job, f"attempt {job.attempt} {outcome.error_message}; "
               f"{status}", **tags)
        return
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
        delay = finished.retry_in_s or 0.0
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
        moved = list(Job.update(status="available", run_at=now(), attempt_base=Job.attempt,
                                finished_at=None, dead_reason=None)
                     .where(Job.id == job_id, Job.status == "dead").returning(Job)
                     .execute())
        if moved and is_postgres():
            db.execute_sql("SELECT pg_notify(%s, %s)",
                           (NOTIFY_CHANNEL, notify_payload(moved[0].queue, 1)))
    # The job as the retry left it: a woken worker may be running it already.
    job = moved[0] if moved else _dlq_result(job_id, 0)
    _event(logging.INFO, "requeued", job, "back from the dead-letter queue with "
           f"{job.max_attempts} fresh attempts", status=job.status)
    return job


def dlq_discard(job_id):
    """Discard a dead job: it becomes `cancelled`, its history kept until pruned."""
    with db.atomic():
        moved = (Job.update(status="cancelled", finished_at=now())
                 .where(Job.id == job_id, Job.status == "dead").execute())
    job = _dlq_result(job_id, moved)
    metrics.count("conveyor_jobs_cancelled", type=job.type, queue=job.queue)
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


def _sql_integer(value):
    return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63


def decode_cursor(cursor, issued=_sql_integer):
    """The position in a cursor; InvalidRequest unless issued(position) says this server
    could have issued it (a job id by default), so no other value reaches the SQL."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))["after"]
        if issued(value):
            return value
    except (ValueError, TypeError, KeyError, UnicodeError, RecursionError):
        pass
    raise InvalidRequest("cursor is not one this server issued", ["cursor: invalid"])


def list_jobs(*, status=None, type=None, queue=None, api_key_id=None, limit=50, cursor=None):
    """A page of jobs, newest first: (jobs, next_cursor or None)."""
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"unknown status {status!r}",
                             [f"status: must be one of {', '.join(STATUSES)}"])
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}", ["limit: out of range"])
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
