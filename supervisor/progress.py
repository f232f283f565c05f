"""ctx.progress for one attempt: the handler's latest value, written at most about once a
second, so that a handler may report in a tight loop and cost the database a write a second.

A report is written at once when this attempt last wrote a second ago or more; otherwise it
waits, and the latest waiting value is written by the next report after the second, by the
worker's heartbeat thread, or at the end of the attempt, before its outcome is reported (so
the last value is never lost). Writes go through the core, which stores them only while the
attempt holds the job's lease.
"""
import logging
import math
import threading
import time

from core import jobs
from models import DB_ERRORS, reset_connection

log = logging.getLogger("conveyor.worker")

WRITE_INTERVAL_S = 1.0


class Progress:
    def __init__(self, job):
        self.job = job
        self.pending = None  # the latest value reported and not written yet, as JSON text
        self.written_m = -math.inf  # when this attempt last wrote (monotonic)
        # The handler reports from the main thread, the heartbeat thread flushes: one write
        # at a time, and a value reported during a write is never taken for the one written.
        self.lock = threading.Lock()

    def report(self, progress_json):
        """ctx.progress: keep the value; write it if the last write is a second old. A
        database that does not answer keeps it waiting, not the handler failing."""
        with self.lock:
            self.pending = progress_json
            if self._due():
                try:
                    self._write()
                except DB_ERRORS as exc:
                    log.warning("progress of job %d not written yet: %s", self.job.id,
                                str(exc).strip()[:200], extra={"job_id": self.job.id})
                    reset_connection()

    def flush(self, due_only=False):
        """Write the waiting value, if any (when due_only, only once the last write is a
        second old: the heartbeat's call). Database errors are the caller's to retry."""
        with self.lock:
            if self.pending is not None and (not due_only or self._due()):
                self._write()

    def _due(self):
        return time.monotonic() - self.written_m >= WRITE_INTERVAL_S

    def _write(self):
        self.written_m = time.monotonic()
        if not jobs.save_progress(self.job, self.pending):
            log.warning("progress of job %d attempt %d not stored: the attempt no longer "
                        "holds the job", self.job.id, self.job.attempt,
                        extra={"job_id": self.job.id, "attempt": self.job.attempt})
        self.pending = None
