"""The job operations: the one owner of every job state change.

Enqueue, claim, heartbeat, finish (succeed, retry, dead-letter), reap, progress, cancel and
the dead-letter queue (one job or in bulk) live here; routes, CLI commands, the supervisor
and its workers only call them. Where an ended attempt sends its job is decided by the pure core/policy.py; every
move of a running job (a worker's report, the reaper, the supervisor, a worker giving back
what it never began) goes through one statement, `step` of core/store, which moves a job
only while it still runs the attempt under the lease the mover knew: the fencing of SPEC §4.
"""
import contextlib
import json
import logging
import os
import threading
from collections import Counter, namedtuple
from typing import NamedTuple, Optional

import peewee as pw

from core import events, flow, status as S
from core.errors import Conflict, LeaseLost
from core.events import Finished
from core.history import get_job
from core import callbacks
from core.policy import Outcome, next_transition, released_outcome, run_order
from core.store import backend
from core.store.postgres import NOTIFY_CHANNEL, notify_payload  # noqa: F401 (for the supervisor)
from core.workers import renew_worker
from infra import metrics
from models import Job, QueueSetting, Step, db, loaded, now

log = logging.getLogger("conveyor.jobs")


def db_time():
    """The database's clock, in epoch seconds (SQLite lives on this host: its clock is ours)."""
    return backend().db_time()


# ---------------------------------------------------------------------------- enqueue

# A job as enqueue answers it: the value of each column of `jobs`, as stored. (Model
# instances cost more to make and to read than the rest of a batch's answer.) In the order
# _new_job gives them: a keyword call of 35 fields costs three times as much, 1,000 a batch.
StoredJob = namedtuple("StoredJob", (
    # what the insert answers
    "id", "status", "run_at", "created_at", "held", "idempotency_key", "unique_hold",
    "expires_at",
    # what was submitted
    "type", "queue", "payload", "priority", "max_attempts", "timeout_s", "backoff_base_s",
    "backoff_max_s", "request_hash", "group_key", "parent_id", "unique_key", "unique_while",
    "has_callback", "api_key_id",
    # what a new job has not yet
    "attempt", "attempt_base", "result", "last_error", "dead_reason", "started_at",
    "finished_at", "lease_owner", "heartbeat_at", "cancel_requested_at", "cancel_reason",
    "progress"))

# Payload bytes one insert statement carries at most: a batch of large payloads goes in
# several (one transaction), so that the driver's copies of a statement and libpq's send
# buffer, which keeps its largest size, stay small however large the batch.
INSERT_CHUNK_BYTES = 1 << 20


def enqueue(new_jobs, api_key_id=None):
    """Insert jobs (core.submission.NewJob) in one transaction; return [(StoredJob,
    created)] in the order given.

    A job with an idempotency key that this API key already used returns the existing
    job (created=False) when the request matches, and raises Conflict when it differs;
    the unique index decides, so concurrent identical requests make one job. On
    PostgreSQL the jobs that can run now are announced (NOTIFY_CHANNEL) at their commit.

    How: a submission alone in this process announces in the statement that stores its
    jobs, one round trip from the call to a waiting worker's wake-up. PostgreSQL holds one
    lock for every notifying commit through that commit's WAL flush, so while other
    submissions are under way here (a web process's threads) each leaves its announcement
    to this process's announcer (_Announcer) after its commit instead: no commit waits for
    another's flush, and the submission sends no statement more (bench/RESULTS.md).
    """
    if not new_jobs:
        return []
    keyed = any(_new_key(new) is not None for new in new_jobs)
    called_back = any(new.callback_url is not None for new in new_jobs)
    chunks = list(_insert_chunks(new_jobs))
    # One statement is atomic by itself; a used key takes a second one (to read the
    # job it names), and a conflict must undo the first; callbacks are stored with their jobs.
    with _submissions.one() as alone, \
            db.atomic() if keyed or called_back or len(chunks) > 1 else contextlib.nullcontext():
        stored = _insert(chunks, new_jobs, api_key_id, announce=alone)
    created = [job for job, was_created in stored if was_created]
    if not alone:
        _announcer.add(Counter(job.queue for job in created
                               if job.status == S.AVAILABLE and not job.held))
    _submitted(created)
    return stored


class _Submissions:
    """How many enqueue calls of this process are under way (a web process's threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.under_way = 0

    @contextlib.contextmanager
    def one(self):
        """Counts one submission while it lasts; yields whether it began alone."""
        with self._lock:
            self.under_way += 1
            alone = self.under_way == 1
        try:
            yield alone
        finally:
            with self._lock:
                self.under_way -= 1


_submissions = _Submissions()


class _Announcer:
    """Announces, from a thread of its own with its own connection, the jobs that
    submissions of this process committed while others were under way: what is added
    while it sends goes out together in its next statement (backend().notify: one
    transaction that waits for no flush), so a busy web process sends one announcement
    for many submissions, and none on the way of a request. A notification lost (the
    process ends first, the statement fails) costs a wake-up, never a job: workers poll."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # threads do not survive a fork

    def _reset(self):
        self._lock = threading.Lock()
        self._due = Counter()
        self._wake = threading.Event()
        self._thread = None

    def add(self, counts):
        if not counts:
            return
        with self._lock:
            self._due.update(counts)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="announcer",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                counts, self._due = self._due, Counter()
            try:
                backend().notify(counts)  # logs its own failure
            except Exception:  # noqa: BLE001 - the announcer outlives any one failure
                log.exception("jobs stored but not announced (workers find them when they poll)")


_announcer = _Announcer()


def _insert(chunks, new_jobs, api_key_id, announce=False):
    """Store new_jobs (in these chunks) in the caller's transaction, with their callbacks:
    [(job, created)]; announce: with a NOTIFY of those that can run now, at its commit."""
    limited = list(flow.type_limits())
    inserted = [row for chunk in chunks
                for row in backend().insert_jobs(chunk, api_key_id, limited, announce)]
    stored = _stored(new_jobs, inserted, api_key_id)
    if any(new.callback_url is not None for new in new_jobs):
        callbacks.register([(job.id, new.callback_url)
                            for new, (job, created) in zip(new_jobs, stored)
                            if created and new.callback_url is not None])
    return stored


def _submitted(created):
    """Count and log jobs stored (after the commit)."""
    for (type_, queue), count in Counter((job.type, job.queue) for job in created).items():
        metrics.count("conveyor_jobs_submitted", count, type=type_, queue=queue)
    if events.log.isEnabledFor(logging.INFO):
        for job in created:
            events.event(logging.INFO, "submitted", job,
                         f"{job.status}, run at {job.run_at:.3f}" if job.status == S.SCHEDULED
                         else job.status)


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


def _stored(new_jobs, inserted, api_key_id):
    """[(job, created)] in the order given. The rows inserted without a key are the jobs
    without one, in order; a key's row is the first job with that key (its idempotency key,
    else its type and unique key). Any other job's key was taken already: an idempotency
    key names the job it made, which must come from an equal request; a unique key, the job
    that holds it (SPEC §12: the submission returns it)."""
    keys = [_new_key(new) for new in new_jobs]
    if not any(keys):  # the usual case: every job stored, in order
        return [(_new_job(new, row, api_key_id), True) for new, row in zip(new_jobs, inserted)]
    row_keys = [_row_key(row) for row in inserted]
    plain = iter([row for row, key in zip(inserted, row_keys) if key is None])
    by_key = {key: row for row, key in zip(inserted, row_keys) if key is not None}
    stored, used = [], []
    for index, (new, key) in enumerate(zip(new_jobs, keys)):
        row = next(plain) if key is None else by_key.pop(key, None)
        stored.append((None, False) if row is None else (_new_job(new, row, api_key_id), True))
        if row is None:
            used.append(index)
    if used:
        keyed = [i for i in used if new_jobs[i].idempotency_key is not None]
        existing = {job.idempotency_key: job for job in Job.select().where(
            pw.fn.COALESCE(Job.api_key_id, 0) == (api_key_id or 0),
            Job.idempotency_key.in_(list({new_jobs[i].idempotency_key for i in keyed})))} \
            if keyed else {}
        conflicts = []
        for index in used:
            job = existing.get(new_jobs[index].idempotency_key) or _holder(new_jobs[index])
            if job is None:
                raise Conflict("the job could not be stored; try again")
            if job.idempotency_key is not None and \
                    job.idempotency_key == new_jobs[index].idempotency_key and \
                    job.request_hash != new_jobs[index].request_hash:
                conflicts.append(index)
            stored[index] = (StoredJob(**job.__data__), False)
        if conflicts:
            raise Conflict("an idempotency key was already used for a different job",
                           [f"{i}: idempotency key {new_jobs[i].idempotency_key!r} was used "
                            f"for a different request (job {stored[i][0].id})" for i in conflicts])
    return stored


def _new_key(new):
    """What makes a new job one of a kind: its idempotency key, else its type and unique
    key (None: neither)."""
    if new.idempotency_key is not None:
        return "idempotency", new.idempotency_key
    return None if new.unique_key is None else ("unique", new.type, new.unique_key)


def _row_key(row):
    """_new_key of a row the insert stored."""
    if row.idempotency_key is not None:
        return "idempotency", row.idempotency_key
    return None if row.unique_hold is None else ("unique", row.type, row.unique_hold)


def _holder(new):
    """The job that holds new's unique key (SPEC §12), or, when it let the key go since,
    the latest job with that key; None when there is none or new has no unique key."""
    if new.unique_key is None:
        return None
    return (Job.select().where(Job.type == new.type, Job.unique_hold == new.unique_key).first()
            or Job.select().where(Job.type == new.type, Job.unique_key == new.unique_key)
            .order_by(Job.id.desc()).first())


# What a new job holds in the columns the insert does not set (StoredJob's last fields).
_UNSET = (0, 0) + (None,) * 10


def _new_job(new, row, api_key_id):
    """The job as stored, from what was sent and what the insert returned (no read-back)."""
    return StoredJob._make((
        row.id, row.status, row.run_at, row.created_at, bool(row.held), row.idempotency_key,
        row.unique_hold, row.expires_at,
        new.type, new.queue, new.payload, new.priority, new.max_attempts, new.timeout_s,
        new.backoff_base_s, new.backoff_max_s, new.request_hash, new.group_key,
        new.parent_id, new.unique_key, new.unique_while, new.callback_url is not None,
        api_key_id, *_UNSET))


# ---------------------------------------------------------------------------- the worker's step

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
    group_key: Optional[str] = None  # its `group`
    api_key_id: Optional[int] = None  # the key that submitted it: its follow-ups' too


class Report(NamedTuple):
    """A finished attempt to record: started_at/finished_at are its times on the database's
    clock (None: the time of recording). fence: from the worker that ran it, whose refused
    outcome marks the attempt fenced (the reaper's or the supervisor's does not)."""
    job: Claimed
    outcome: Outcome
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    fence: bool = True


def claim(worker, limit=1):
    """Start up to `limit` due jobs for `worker` (core.workers.WorkerInfo); returns them."""
    return step(worker, (), limit)[0]


def report(job, outcome):
    """A worker reports its attempt's outcome. False when its lease was lost: the outcome
    is refused, the attempt is marked fenced and the job is left as it is."""
    return step(None, [Report(job, outcome)], 0)[1][0]


def step(worker, reports=(), limit=1, after_idle=False):
    """Record the outcomes of finished attempts and start up to `limit` new ones, in one
    round trip on PostgreSQL (one statement) and one transaction on SQLite.

    Each outcome is accepted only from the lease that holds its job (fencing). after_idle:
    the worker's last claim found nothing due, so what is due now came since, and there is
    no backlog to take by turns (fair share): the claim takes the oldest without first
    looking for lanes, a statement less on the way from a new job to its start.
    Returns (claimed jobs in the order to run them, [accepted?] per report).
    """
    claimed, accepted, _ = _step(worker, reports, limit, after_idle=after_idle)
    return claimed, accepted


def _step(worker, reports, limit, event=None, after_idle=False):
    """step, also returning what was moved ([Finished]), each counted and logged (as
    `event` when given: the reaper's `reaped`)."""
    rows = [_reported(r) for r in reports]
    if not rows and not limit:
        return [], [], []
    limits = flow.type_limits()
    store = backend()
    turns = None
    if limit and not after_idle and flow.several_lanes(worker, store):  # fair share
        turns = [row["id"] for row in store.turns(worker, limit)]
    under_limits = limits if limit and (limits or flow.queue_limits_exist()) else None
    # A success's follow-up jobs are stored with it or not at all (SPEC §12): in the step's
    # transaction, for the reports whose success was recorded now (not refused, and not
    # recorded before by this same report sent again).
    followed = any(r.outcome.followups for r in reports)
    with db.atomic() if followed else contextlib.nullcontext():
        claimed, limited, moved, refused = store.step(worker, rows, limit, turns, under_limits,
                                                      flow.RATE_GUARD)
        followups = _store_followups(reports, moved) if followed else []
    accepted, done = [], []
    for report_, row in zip(reports, rows):
        job, outcome = report_.job, report_.outcome
        if job.id in moved:
            now_row = moved[job.id]
            done.append(Finished(job, outcome, now_row["status"], now_row["dead_reason"],
                                 row["delay_s"], now_row["duration_s"]))
        elif job.id in refused:
            events.event(logging.WARNING, "refused", job,
                         f"late outcome refused: attempt {job.attempt} {outcome.status} after "
                         f"its lease was lost", attempt=job.attempt, worker_id=job.lease_owner)
        accepted.append(job.id not in refused)  # neither: our own earlier report committed
    for finished in done:
        events.finished(finished, event)
    _submitted(followups)
    # A job under limits first: its start must follow its claim (a rate counts claims).
    limited = [_claimed(row) for row in limited]
    _wake_for_places(done, limits, retaken={_limits_of(job) for job in limited})
    jobs = limited + sorted(map(_claimed, claimed), key=run_order)
    for job in jobs:
        events.event(logging.INFO, "started", job, f"attempt {job.attempt} on {worker.id}",
                     attempt=job.attempt, worker_id=worker.id)
    return jobs, accepted, done


def _store_followups(reports, moved):
    """Store the follow-up jobs of the reports whose success this step recorded, each
    parent's with its API key, announced at the step's commit (the step's own claim ran
    before they existed); the jobs stored."""
    created = []
    for report_ in reports:
        job, new_jobs = report_.job, report_.outcome.followups
        if new_jobs and moved.get(job.id, {}).get("status") == S.SUCCEEDED:
            stored = _insert(list(_insert_chunks(new_jobs)), new_jobs, job.api_key_id,
                             announce=True)
            created += [new for new, was_created in stored if was_created]
    return created


def _reported(report_):
    """The values one outcome writes (by these names): the retry policy decided here,
    the guard and the move in SQL."""
    job, outcome = report_.job, report_.outcome
    move = next_transition(job, outcome)
    result = None if outcome.result is None or move.status != S.SUCCEEDED else \
        json.dumps(outcome.result, separators=(",", ":"))
    values = {"id": job.id, "attempt": job.attempt, "lease_owner": job.lease_owner,
              "status": move.status, "delay_s": move.delay_s, "result": result,
              "last_error": None if move.refund else outcome.error,
              "dead_reason": move.dead_reason, "attempt_status": outcome.status,
              "error_type": outcome.error_type, "error_message": outcome.error_message,
              "traceback": outcome.traceback, "started_at": report_.started_at,
              "finished_at": report_.finished_at, "refund": int(move.refund),
              "fence": report_.fence}
    return values


def _wake_for_places(done, limits, retaken):
    """A job under a limit that ended freed a place: wake idle workers (every supervisor's,
    on PostgreSQL) to take the next one, rather than leave it to their next poll. A place
    this worker's own claim took again (jobs of the same type, queue and group: `retaken`)
    wakes nobody: waking workers only for them to find it taken would cost every one of
    them a claim, and it the place, when they win it first."""
    if not done:
        return
    queues_limited = flow.queue_limits_exist()
    freed = Counter(f.job.queue for f in done if (queues_limited or f.job.type in limits)
                    and _limits_of(f.job) not in retaken)
    if freed:
        backend().notify(freed)


def _limits_of(job):
    """What decides the limits a job is under (SPEC §11): its type, queue and group."""
    return job.type, job.queue, job.group_key


def _claimed(row):
    return Claimed(**row)._replace(payload=json.loads(row["payload"]))


def step_statement(worker, reports=(), limit=1):
    """(sql, params): on PostgreSQL, the one statement `step(worker, reports, limit)` runs,
    as it runs it (for the plan tests)."""
    return backend().step_statement(worker, [_reported(r) for r in reports], limit)


def claim_statement(worker, limit=1):
    """(sql, params): the statement `claim(worker, limit)` runs on the open database, as it
    runs it, for what must see it whole: the plan tests (EXPLAIN), and the fault tests that
    pick its prepared name out of the wire (models.statement_name). With no limits given,
    as here, it claims no job under limits."""
    return backend().claim_statement(worker, limit)


def stage_due():
    """Mark scheduled and retryable jobs whose time has come `available` (claim takes them
    either way; this keeps the stored status true for readers)."""
    return (Job.update(status=S.AVAILABLE)
            .where(Job.status.in_((S.SCHEDULED, S.RETRYABLE)), Job.run_at <= now())
            .execute())


def expire_due():
    """End every waiting job whose expiry passed `cancelled`, cancel_reason `expired` (SPEC
    §12): the claims already pass them over, held back by a limit or a pause or not. Returns
    how many ended."""
    moment = now()
    expired = list(Job.update(status=S.CANCELLED, cancel_reason="expired", finished_at=moment)
                   .where(Job.status.in_(S.PENDING), Job.expires_at <= moment)
                   .returning(Job.id, Job.type, Job.queue).execute())
    for job in expired:
        metrics.count("conveyor_jobs_cancelled", type=job.type, queue=job.queue)
        events.event(logging.INFO, "expired", job, "not started before it expired; cancelled")
    return len(expired)


def sync_held(limited_types=None):
    """Keep `held` true of every waiting job under a limit (of its type, of its queue, or a
    pause) and of no other, whatever changed since it was stored: a queue paused or limited,
    a limit added to or taken from a type by a new deploy. Submission marks jobs as they are
    stored; this catches up within its interval (a supervisor duty, every second). Returns
    how many jobs changed."""
    limited_types = list(flow.type_limits()) if limited_types is None else limited_types
    held_queues = QueueSetting.select(QueueSetting.name).where(
        QueueSetting.paused | QueueSetting.concurrency.is_null(False)
        | QueueSetting.rate_count.is_null(False))
    limited = Job.type.in_(limited_types) | Job.queue.in_(held_queues)
    waiting = Job.status.in_(S.PENDING)
    changed = Job.update(held=False).where(waiting, Job.held, ~limited).execute()
    if limited_types or held_queues.exists():  # else no waiting job needs reading
        changed += Job.update(held=True).where(waiting, ~Job.held, limited).execute()
    return changed


# ---------------------------------------------------------------------------- leases

def heartbeat(worker, job_ids=()):
    """Renew the worker's registration and the leases it holds on these jobs; returns the
    ids of those whose lease it still holds.

    Only the jobs the worker knows it holds: a claim whose answer was lost (the connection
    broke after the commit) leaves jobs under its lease that it will never run, and those
    must expire and be reaped, not be kept alive forever."""
    with db.atomic():
        renew_worker(worker)
        if not job_ids:
            return set()
        renewed = (Job.update(heartbeat_at=now())
                   .where(Job.id.in_(list(job_ids)), Job.status == S.RUNNING,
                          Job.lease_owner == worker.id)
                   .returning(Job.id).execute())
        return {row.id for row in renewed}


def _holds(job):
    """The SQL condition "job is still running this attempt under this lease" (the guard
    of core/store's step, for the statements written once for both databases)."""
    return ((Job.id == job.id) & (Job.status == S.RUNNING)
            & (Job.attempt == job.attempt) & (Job.lease_owner == job.lease_owner))


def lease_held(job):
    return Job.select(Job.id).where(_holds(job)).exists()


# ---------------------------------------------------------------------------- ending what the dead held

def end_attempts(worker_id, outcome, running_job_id=None):
    """A supervisor ends what its dead or killed worker held: the attempt whose handler was
    running (running_job_id, from the worker's slot) ends with outcome; every other job the
    worker had claimed never began, and is released. Returns the jobs ended."""
    held = list(Job.select().where(Job.status == S.RUNNING, Job.lease_owner == worker_id))
    released = released_outcome(f"its worker {worker_id} ended first ({outcome.error})")
    return _end([Report(job, outcome if job.id == running_job_id else released, fence=False)
                 for job in held])


def release(worker_id, job_ids, why):
    """A worker gives back jobs it claimed and will not begin; returns the jobs released."""
    held = list(Job.select().where(Job.id.in_(list(job_ids)), Job.status == S.RUNNING,
                                   Job.lease_owner == worker_id))
    outcome = released_outcome(why)
    return _end([Report(job, outcome, fence=False) for job in held])


def _end(reports, event=None):
    """Move these running jobs by their reports (one transition, as a worker's report is
    recorded); wake idle workers for the jobs released among them. Returns the jobs moved."""
    _, _, done = _step(None, reports, 0, event)
    _wake_for_released(done)
    return [finished.job for finished in done]


def _wake_for_released(done):
    released = Counter(f.job.queue for f in done if f.outcome.status == S.RELEASED)
    if released:
        backend().notify(released)


def reap_expired(lease_s, limit=100):
    """Record the attempts of workers whose heartbeat is older than the lease; any process
    may call this. Such a worker was lost with everything it held, and nobody saw how far
    through its claim it got: the first job in its run order is charged the attempt
    (`crashed`, as if its handler was running), the rest are released. A worker's claim is
    taken whole, its rows locked in one transaction, so two reapers cannot each charge a
    different job; a heartbeat that lands first wins (the lock re-reads staleness).
    Returns the jobs ended (crashed and released)."""
    owners = (Job.select(Job.lease_owner)
              .where(Job.status == S.RUNNING, Job.heartbeat_at < now() - lease_s)
              .distinct().limit(limit).tuples())
    crashed = Outcome(S.CRASHED, error_type="LeaseExpired",
                      error_message=f"no heartbeat for over {lease_s:g}s: worker or host lost")
    released = released_outcome(f"no heartbeat for over {lease_s:g}s, and an earlier job of "
                                f"the same claim was charged the attempt")
    reaped = []
    for (owner,) in list(owners):
        with db.atomic():
            held = sorted((loaded(Job, _job_columns(row))
                           for row in backend().stale_claim(owner, lease_s)), key=run_order)
            _, _, done = _step(None, [Report(job, crashed if job is held[0] else released,
                                             fence=False) for job in held], 0, "reaped")
        for finished in done:
            if finished.outcome is crashed:
                metrics.count("conveyor_attempts_reaped", type=finished.job.type,
                              queue=finished.job.queue)
        _wake_for_released(done)
        reaped += [finished.job for finished in done]
    return reaped


_JOB_COLUMNS = frozenset(Job._meta.sorted_field_names)


def _job_columns(row):
    return {name: value for name, value in row.items() if name in _JOB_COLUMNS}


# ---------------------------------------------------------------------------- steps

def load_step(job_id, name):
    """(True, result) when a step of this job already ran, else (False, None)."""
    step_ = Step.get_or_none(Step.job_id == job_id, Step.name == name)
    return (True, step_.result) if step_ is not None else (False, None)


def save_step(job, name, result):
    """Store a step's result, only while job's lease is held; raise LeaseLost otherwise."""
    stored = list(Step.insert_from(
        Job.select(Job.id, pw.Value(name), pw.Value(json.dumps(result)), Job.attempt,
                   now())
        .where(_holds(job)),
        [Step.job_id, Step.name, Step.result, Step.attempt, Step.created_at])
        .on_conflict(action="NOTHING").returning(Step.job_id).execute())
    if stored:
        return result
    found, existing = load_step(job.id, name)
    if not found or not lease_held(job):
        raise LeaseLost(f"job {job.id} attempt {job.attempt} lost its lease")
    return existing


# ---------------------------------------------------------------------------- progress

def save_progress(job, progress_json):
    """Store an attempt's latest progress (JSON text), only while it holds the job's lease;
    False when it does not (the value is dropped: the job may be another attempt's now).
    The worker coalesces a handler's reports, so that this runs about once a second."""
    written = (Job.update({Job.progress: pw.Value(progress_json, converter=False)})
               .where(_holds(job)).execute())
    if written:
        metrics.count("conveyor_progress_writes", type=job.type, queue=job.queue)
    return bool(written)


# ---------------------------------------------------------------------------- cancel, DLQ

def cancel(job_id, api_key_id=None):
    """Cancel a job: at once if it is waiting; a running one is flagged and its supervisor
    stops the worker. Returns (job, stopped_now)."""
    get_job(job_id, api_key_id)
    with db.atomic():
        stopped = (Job.update(status=S.CANCELLED, finished_at=now())
                   .where(Job.id == job_id, Job.status.in_(S.PENDING)).execute())
        flagged = not stopped and (
            Job.update(cancel_requested_at=pw.fn.COALESCE(Job.cancel_requested_at, now()))
            .where(Job.id == job_id, Job.status == S.RUNNING).execute())
    job = get_job(job_id)
    if stopped:
        metrics.count("conveyor_jobs_cancelled", type=job.type, queue=job.queue)
        events.event(logging.INFO, "cancelled", job, "cancelled before it ran", status=job.status)
        return job, True
    if flagged:
        events.event(logging.INFO, "cancelling", job, f"attempt {job.attempt} is running; its "
                     f"supervisor stops the worker", attempt=job.attempt,
                     worker_id=job.lease_owner)
        return job, False
    raise Conflict(f"job {job_id} is {job.status} and cannot be cancelled")


def cancel_all(selection):
    """cancel for every job the selection (core.selection.Selection) matches, in two
    statements: the waiting ones are cancelled at once, the running ones flagged for their
    supervisors to stop. Returns how many of both."""
    matching = selection.conditions()
    with db.atomic():
        stopped = list(Job.update(status=S.CANCELLED, finished_at=now())
                       .where(Job.status.in_(S.PENDING), *matching)
                       .returning(Job.id, Job.type, Job.queue).execute())
        flagged = list(Job.update(cancel_requested_at=pw.fn.COALESCE(Job.cancel_requested_at,
                                                                     now()))
                       .where(Job.status == S.RUNNING, *matching)
                       .returning(Job.id, Job.type, Job.queue).execute())
    for (type_, queue), count in Counter((job.type, job.queue) for job in stopped).items():
        metrics.count("conveyor_jobs_cancelled", count, type=type_, queue=queue)
    events.log.info("cancelled %d waiting jobs and asked %d running ones to stop (%s)",
                    len(stopped), len(flagged), selection.describe(),
                    extra={"event": "cancelled_all", "count": len(stopped) + len(flagged)})
    if events.log.isEnabledFor(logging.INFO):
        for job in stopped:
            events.event(logging.INFO, "cancelled", job, "cancelled before it ran",
                         status=S.CANCELLED)
        for job in flagged:
            events.event(logging.INFO, "cancelling", job, "running; its supervisor stops "
                         "the worker")
    return len(stopped) + len(flagged)


def cancellations(worker_ids):
    """Running jobs of these workers whose cancellation was requested."""
    if not worker_ids:
        return []
    return list(Job.select(Job.id, Job.attempt, Job.lease_owner)
                .where(Job.status == S.RUNNING, Job.lease_owner.in_(list(worker_ids)),
                       Job.cancel_requested_at.is_null(False)))


def _back_from_the_dead():
    """What a DLQ retry writes: available now, with a fresh attempt budget (the attempts
    spent so far become the base); the attempts' history is kept."""
    return {Job.status: S.AVAILABLE, Job.run_at: now(), Job.attempt_base: Job.attempt,
            Job.finished_at: None, Job.dead_reason: None}


def dlq_retry(job_id):
    """Send a dead job back to `available` with a fresh attempt budget; history is kept."""
    with db.atomic():
        moved = list(Job.update(_back_from_the_dead())
                     .where(Job.id == job_id, Job.status == S.DEAD).returning(Job)
                     .execute())
        if moved:
            backend().notify({moved[0].queue: 1})
    # The job as the retry left it: a woken worker may be running it already.
    job = moved[0] if moved else _dlq_result(job_id, 0)
    events.event(logging.INFO, "requeued", job, "back from the dead-letter queue with "
                 f"{job.max_attempts} fresh attempts", status=job.status)
    return job


def dlq_retry_all(selection):
    """dlq_retry for every dead job the selection (core.selection.Selection) matches, in
    one statement; returns how many went back to the queue."""
    with db.atomic():
        moved = list(Job.update(_back_from_the_dead())
                     .where(Job.status == S.DEAD, *selection.conditions())
                     .returning(Job.id, Job.type, Job.queue).execute())
        if moved:
            backend().notify(Counter(job.queue for job in moved))
    events.log.info("requeued %d jobs from the dead-letter queue (%s)", len(moved),
                    selection.describe(), extra={"event": "requeued_all", "count": len(moved)})
    if events.log.isEnabledFor(logging.INFO):
        for job in moved:
            events.event(logging.INFO, "requeued", job, "back from the dead-letter queue "
                         "with a fresh attempt budget", status=S.AVAILABLE)
    return len(moved)


def dlq_discard(job_id):
    """Discard a dead job: it becomes `cancelled`, its history kept until pruned."""
    with db.atomic():
        moved = (Job.update(status=S.CANCELLED, finished_at=now())
                 .where(Job.id == job_id, Job.status == S.DEAD).execute())
    job = _dlq_result(job_id, moved)
    metrics.count("conveyor_jobs_cancelled", type=job.type, queue=job.queue)
    events.event(logging.INFO, "discarded", job, "discarded from the dead-letter queue",
                 status=job.status)
    return job


def _dlq_result(job_id, moved):
    job = get_job(job_id)
    if not moved:
        raise Conflict(f"job {job_id} is {job.status}, not in the dead-letter queue")
    return job
