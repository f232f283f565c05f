"""A worker process: claim a job, run its handler, report the outcome; repeat.

Forked by the supervisor, it runs one attempt at a time. A heartbeat thread renews the
lease of the running attempt, so a stalled or partitioned worker loses its job to the
reaper; its late outcome is then refused (fencing). The supervisor watches the shared
slot this worker writes its current job to, and kills the process on a timeout or a
cancellation.
"""
import json
import logging
import os
import random
import signal
import threading
import time
import traceback
from functools import partial

import handlers
import jobs
import metrics
from models import DB_ERRORS, reset_connection

log = logging.getLogger("conveyor.worker")


class WorkerProcess:
    def __init__(self, worker, slot, settings):
        self.worker = worker
        self.slot = slot
        self.settings = settings
        self.parent_pid = os.getppid()
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.current = None  # the job being run, read by the heartbeat thread
        self.reports = 0  # odd while an outcome is being reported, read by the heartbeat
        self.jobs_done = 0

    def run(self):
        """The child's main: returns the exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, not a Ctrl-C
        self._until_done(partial(jobs.register_worker, self.worker))
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        while not self.stopping.is_set() and not self._orphaned() and not self._worn_out():
            asked_m = time.monotonic()
            claimed = self._until_done(partial(jobs.claim, self.worker, 1),
                                       give_up_when_stopping=True)
            if not claimed:
                self.stopping.wait(self.settings.poll_interval_s * random.uniform(0.5, 1.0))
                continue
            for job in claimed:
                if self._lease_in_doubt(asked_m) and \
                        not self._until_done(partial(jobs.heartbeat, self.worker, job)):
                    log.warning("lease lost before the attempt started; not running it",
                                extra=_tags(job, self.worker))
                    continue
                self._run_one(job)
        self.finished.set()
        self._until_done(metrics.flush, give_up_when_stopping=True)
        self._until_done(partial(jobs.deregister_worker, self.worker.id), give_up_when_stopping=True)
        return 0

    def _run_one(self, job):
        self.current = job
        self.slot.start(job.id, job.attempt, time.monotonic() + job.timeout_s, job.timeout_s)
        outcome = execute(job)
        self.reports += 1
        self._until_done(partial(jobs.report, job, outcome))  # the core logs what it did
        self.slot.clear()
        self.current = None
        self.reports += 1
        self.jobs_done += 1

    def _heartbeat(self):
        while not self.finished.wait(self.settings.heartbeat_s):
            if self._orphaned():
                # Our supervisor died: stop renewing, so the reaper hands our job to another.
                os._exit(70)
            reports = self.reports
            job = self.current
            try:
                renewed = jobs.heartbeat(self.worker, job)
                # A renewal that lost the race to the job's own report finds no lease either.
                if not renewed and reports % 2 == 0 and self.reports == reports:
                    log.warning("lease lost while running", extra=_tags(job, self.worker))
                metrics.flush()
            except DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", _first_line(exc))
                reset_connection()

    def _until_done(self, operation, give_up_when_stopping=False):
        """Run a database operation, retrying through outages with a capped backoff."""
        delay = 0.1
        while True:
            try:
                return operation()
            except DB_ERRORS as exc:
                log.warning("database unavailable (%s); retrying in %.1fs", _first_line(exc), delay)
                reset_connection()
                if give_up_when_stopping and self.stopping.is_set():
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _lease_in_doubt(self, asked_m):
        """A claim answered this late (a partition, a stall) may have outlived its lease
        before the heartbeat thread first renews it: someone else may run the job now."""
        return time.monotonic() - asked_m > self.settings.lease_s - self.settings.heartbeat_s

    def _orphaned(self):
        return os.getppid() != self.parent_pid

    def _worn_out(self):
        """Replace this process after WORKER_MAX_JOBS jobs or above WORKER_MAX_MEMORY_MB."""
        if self.settings.worker_max_jobs and self.jobs_done >= self.settings.worker_max_jobs:
            return True
        return bool(self.settings.worker_max_memory_mb) and \
            resident_mb() > self.settings.worker_max_memory_mb


def execute(job):
    """Run the job's handler and say how the attempt ended; never raises."""
    handler = handlers.get(job.type)
    if handler is None:
        return jobs.Outcome("failed", error_type="UnknownJobType",
                            error_message=f"no handler for {job.type!r} on this worker")
    ctx = handlers.Context(
        job_id=job.id, attempt=job.attempt, max_attempts=job.max_attempts, queue=job.queue,
        idempotency_key=job.idempotency_key or str(job.id), timeout_s=job.timeout_s,
        step=partial(run_step, job))
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
        return jobs.Outcome("failed", error_type="ResultNotJSON",
                            error_message=f"the handler returned a value that is not "
                                          f"JSON-serialisable: {exc}")
    return jobs.Outcome("succeeded", result=result)


def _failure(exc, **policy):
    return jobs.Outcome("failed", error_type=type(exc).__name__, error_message=str(exc)[:4000],
                        traceback=traceback.format_exc()[-16000:], **policy)


def run_step(job, name, fn):
    """ctx.step: fn's result is stored once per job; later attempts get the stored one."""
    found, result = jobs.load_step(job.id, name)
    if found:
        return result
    if not jobs.lease_held(job):
        raise jobs.LeaseLost(f"job {job.id} attempt {job.attempt} lost its lease")
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


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
