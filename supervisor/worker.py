"""A worker process: claim jobs, run their handlers, report the outcomes; repeat.

Forked by the supervisor, it runs one attempt at a time. Each round trip to the database
(jobs.step) reports the attempts just finished and claims the next ones: one job at a
time when jobs are slow or scarce, up to WORKER_BATCH when they are fast, so a round trip
is shared by many. A heartbeat thread renews the leases of what it holds, so a stalled or
partitioned worker loses its jobs to the reaper; its late outcomes are then refused
(fencing). With nothing to claim it sleeps on its wake pipe until the supervisor passes
on an announced job, or the poll interval passes. The supervisor watches the shared slot
this worker writes its current job and state to, and kills the process on a timeout or a
cancellation.
"""
import json
import logging
import os
import random
import select
import signal
import threading
import time
import traceback
from functools import partial

import handlers
from core import status as states
from core.policy import Outcome
from core import flow, jobs
from core.submission import Rules, validate_submission
from core import workers
from infra import metrics
from core.errors import LeaseLost, Refused
from models import DB_ERRORS, reason, reset_connection
from supervisor import slots
from supervisor.progress import Progress

log = logging.getLogger("conveyor.worker")


# A batch of claimed jobs should take about this long: long enough to spread one round trip
# over many fast jobs, short enough that the last attempt of a batch starts soon after its
# claim. Slow jobs are claimed one at a time.
BATCH_TARGET_S = 0.01


class WorkerProcess:
    def __init__(self, worker, slot, pipe, settings):
        self.worker = worker
        self.slot = slot
        self.pipe = pipe  # the supervisor wakes us through it when a job is announced
        self.settings = settings
        self.rules = Rules.from_settings(settings)  # what a follow-up job is checked against
        self.parent_pid = os.getppid()
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.held = frozenset()  # ids of jobs claimed and not yet reported, for the heartbeat
        self.steps = 0  # odd while a step (reports and claims) is under way
        self.jobs_done = 0
        # Where the current claim stands, for leaving it cleanly if the supervisor dies:
        # the jobs not begun yet and the reports of those finished. Changed under the lock
        # by the main thread, read under it by the heartbeat thread.
        self.claim_lock = threading.Lock()
        self.unstarted = []
        self.finished_reports = []
        self.progress = None  # the running attempt's ctx.progress, flushed by the heartbeat too

    def run(self):
        """The child's main: returns the exit code."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, not a Ctrl-C
        self._until_done(partial(workers.register_worker, self.worker))
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        reports, limit, idle = [], 1, False
        while True:
            leaving = self.stopping.is_set() or self._orphaned() or self._worn_out()
            self.slot.state = slots.CLAIMING
            asked_m = time.monotonic()
            claimed = self._step(reports, 0 if leaving else limit, idle)
            reports = []
            if leaving:
                break
            idle = not claimed
            if idle:
                limit = 1  # what comes next after a lull may be slow: no hoarding it
                self._sleep()
                continue
            self.slot.state = slots.BUSY
            reports = self._run_batch(claimed, asked_m)
            limit = self._next_limit(reports)
        self.finished.set()
        self._until_done(metrics.flush, give_up_when_stopping=True)
        self._until_done(partial(workers.deregister_worker, self.worker.id), give_up_when_stopping=True)
        return 0

    def _stop(self, *_):
        self.stopping.set()
        self.pipe.wake()  # out of _sleep at once

    def _sleep(self):
        """Until the supervisor wakes us for an announced job, or the poll interval passes
        (the fallback when announcements are lost, and the only way on SQLite). What the
        claim reads of the queues' limits is read first if it would be stale by then, so
        that the claim that follows a wake-up goes to the database once."""
        try:
            flow.queue_limits_exist(ahead_s=self.settings.poll_interval_s)
        except DB_ERRORS:
            reset_connection()  # the claim will find the outage and wait it out
        self.slot.state = slots.WAITING
        if not self.stopping.is_set():
            select.select([self.pipe.read_fd], [], [],
                          self.settings.poll_interval_s * random.uniform(0.5, 1.0))
        self.pipe.drain()

    def _step(self, reports, limit, after_idle):
        """Report the finished attempts and claim the next ones, retrying through outages;
        reports are never given up (the supervisor ends us after the grace period)."""
        self.steps += 1
        claimed, _ = self._until_done(partial(jobs.step, self.worker, reports, limit,
                                              after_idle),
                                      give_up_when_stopping=not reports) or ([], [])
        with self.claim_lock:
            self.held = frozenset(job.id for job in claimed)
            self.unstarted, self.finished_reports = list(claimed), []
            self.steps += 1
        self.jobs_done += len(reports)
        return claimed

    def _run_batch(self, claimed, asked_m):
        """Run the claimed jobs one after another; returns their reports, with each
        attempt's times on the database's clock: its claim time plus our time since the
        claim returned, which can only fall short of the truth, never overrun it."""
        claimed_m = time.monotonic()
        reports = self.finished_reports
        for job in claimed:
            if self._lease_in_doubt(asked_m) and \
                    job.id not in (self._until_done(partial(jobs.heartbeat, self.worker, [job.id])) or ()):
                log.warning("lease lost before the attempt started; not running it",
                            extra=_tags(job, self.worker))
                with self.claim_lock:
                    self.unstarted.pop(0)
                continue
            if flow.starts_too_late(job, time.monotonic() - asked_m):
                with self.claim_lock:
                    self.unstarted.pop(0)
                self._until_done(partial(jobs.release, self.worker.id, [job.id],
                                         "it would start too long after its claim for its rate"))
                continue
            with self.claim_lock:
                self.unstarted.pop(0)  # it is begun from here on
                started_m = time.monotonic()
                self.slot.start(job.id, job.attempt, started_m + job.timeout_s, job.timeout_s)
            self.progress = Progress(job)
            outcome = execute(job, self.progress.report, self.rules)
            ended_m = time.monotonic()
            self._until_done(self.progress.flush)  # its last value, before its outcome
            self.progress = None
            with self.claim_lock:
                reports.append(jobs.Report(job, outcome, job.started_at + (started_m - claimed_m),
                                           job.started_at + (ended_m - claimed_m)))
        self.slot.clear()
        return reports

    def _next_limit(self, reports):
        """How many jobs to claim next: as many as fit BATCH_TARGET_S at the pace of the last
        batch, at most WORKER_BATCH."""
        if not reports:
            return 1
        took = sum(r.finished_at - r.started_at for r in reports) / len(reports)
        return max(1, min(self.settings.worker_batch, int(BATCH_TARGET_S / max(took, 1e-5))))

    def _heartbeat(self):
        while not self.finished.wait(self.settings.heartbeat_s):
            if self._orphaned():
                self._abandon()
            steps, held = self.steps, self.held
            try:
                renewed = jobs.heartbeat(self.worker, held)
                # A renewal that raced our own step finds those leases moved on, not lost.
                lost = held - renewed if steps % 2 == 0 and self.steps == steps else ()
                for job_id in lost:
                    log.warning("lease of job %d lost while it was held", job_id,
                                extra={"job_id": job_id, "worker_id": self.worker.id})
                progress = self.progress
                if progress is not None:
                    progress.flush(due_only=True)
                metrics.flush()
            except DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", reason(exc))
                reset_connection()

    def _abandon(self):
        """Our supervisor died: leave at once, without renewing, so that the reaper hands
        the attempt under way to another worker after its lease. First give back what the
        reaper could not tell apart from it: the outcomes already known are reported and
        the claimed jobs not begun are released. The main thread begins no job meanwhile;
        a step under way (its claim unknown yet) is left to the reaper."""
        with self.claim_lock:
            if self.steps % 2 == 0:
                try:
                    jobs.step(self.worker, list(self.finished_reports), 0)
                    jobs.release(self.worker.id, [job.id for job in self.unstarted],
                                 f"worker {self.worker.id} lost its supervisor")
                except DB_ERRORS as exc:
                    log.warning("could not give back the claim before leaving: %s",
                                reason(exc))
            logging.shutdown()
            os._exit(70)

    def _until_done(self, operation, give_up_when_stopping=False):
        """Run a database operation, retrying through outages with a capped backoff. A
        wake-up from the supervisor cuts a wait short: it wakes every worker when its
        LISTEN connection is back after an outage (a failover, say), so the database may
        be back too, and when it stops us."""
        delay = 0.1
        while True:
            try:
                return operation()
            except DB_ERRORS as exc:
                log.warning("database unavailable (%s); retrying in %.1fs", reason(exc), delay)
                reset_connection()
                if give_up_when_stopping and self.stopping.is_set():
                    return None
                select.select([self.pipe.read_fd], [], [], delay)
                self.pipe.drain()
                delay = min(delay * 2, 2.0)

    def _lease_in_doubt(self, asked_m):
        """A claim answered this late (a partition, a stall), or a batch that has run this
        long since, may have outlived its lease before the heartbeat thread renews it:
        someone else may run the job now."""
        return time.monotonic() - asked_m > self.settings.lease_s - self.settings.heartbeat_s

    def _orphaned(self):
        return os.getppid() != self.parent_pid

    def _worn_out(self):
        """Replace this process after WORKER_MAX_JOBS jobs or above WORKER_MAX_MEMORY_MB."""
        if self.settings.worker_max_jobs and self.jobs_done >= self.settings.worker_max_jobs:
            return True
        return bool(self.settings.worker_max_memory_mb) and \
            resident_mb() > self.settings.worker_max_memory_mb


def execute(job, report_progress, rules=Rules()):
    """Run the job's handler and say how the attempt ended; never raises. report_progress
    takes what the handler passes ctx.progress, as JSON text. The follow-up jobs it asked
    for (ctx.enqueue, checked against `rules`) go with a success."""
    handler = handlers.get(job.type)
    if handler is None:
        return Outcome(states.FAILED, error_type="UnknownJobType",
                            error_message=f"no handler for {job.type!r} on this worker")
    followups = []
    ctx = handlers.Context(
        job_id=job.id, attempt=job.attempt, max_attempts=job.max_attempts, queue=job.queue,
        idempotency_key=job.idempotency_key or str(job.id), timeout_s=job.timeout_s,
        step=partial(run_step, job), progress=report_progress,
        enqueue=partial(follow_up, job, rules, followups))
    try:
        result = handler.fn(job.payload, ctx)
    except handlers.Permanent as exc:
        return _failure(exc, permanent=True)
    except handlers.RetryAfter as exc:
        return _failure(exc, retry_in=exc.seconds)
    except BaseException as exc:  # a handler's sys.exit() is a failed attempt too
        return _failure(exc)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return Outcome(states.FAILED, error_type="ResultNotJSON",
                            error_message=f"the handler returned a value that is not "
                                          f"JSON-serialisable: {exc}")
    return Outcome(states.SUCCEEDED, result=result, followups=tuple(followups))


def follow_up(job, rules, followups, type_, payload, options):
    """ctx.enqueue: check a follow-up job as a submission (ValueError when it is not one)
    and keep it for the success of this attempt."""
    body = {**options, "type": type_, "payload": payload}
    if "idempotency_key" in options:
        raise ValueError("a follow-up job takes no idempotency_key: it is created once anyway")
    try:
        new = validate_submission(body, rules)
    except Refused as exc:
        raise ValueError("; ".join([f"follow-up job {type_!r}: {exc.detail}", *exc.errors])) from None
    followups.append(new._replace(parent_id=job.id))


def _failure(exc, **policy):
    return Outcome(states.FAILED, error_type=type(exc).__name__, error_message=str(exc)[:4000],
                        traceback=traceback.format_exc()[-16000:], **policy)


def run_step(job, name, fn):
    """ctx.step: fn's result is stored once per job; later attempts get the stored one."""
    found, result = jobs.load_step(job.id, name)
    if found:
        return result
    if not jobs.lease_held(job):
        raise LeaseLost(f"job {job.id} attempt {job.attempt} lost its lease")
    # Every attempt gets the stored JSON form (lists, not tuples), not only the later ones.
    result = json.loads(json.dumps(fn(), allow_nan=False))
    return jobs.save_step(job, name, result)


def resident_mb():
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return 0.0


def _tags(job, worker):
    return {"job_id": job.id, "type": job.type, "attempt": job.attempt, "worker_id": worker.id}
