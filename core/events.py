"""What the core says of a committed transition: one log line per job event, and the
metrics of it (counted into infra.metrics, the sink). Called after the commit, never
inside the transaction that made the change."""
import logging
from dataclasses import dataclass
from typing import Any, Optional

from core import status as S
from core.policy import Outcome
from infra import metrics

log = logging.getLogger("conveyor.jobs")


@dataclass(frozen=True)
class Finished:
    """A running job moved by an outcome: the outcome recorded and where the job went."""
    job: Any
    outcome: Outcome
    status: str
    dead_reason: Optional[str]
    retry_in_s: Optional[float]  # the policy's delay, counted from the attempt's end
    duration_s: Optional[float]


def event(level, name, job, message, **tags):
    log.log(level, "job %d %s: %s", job.id, name, message,
            extra={"event": name, "job_id": job.id, "type": job.type, "queue": job.queue,
                   **tags})


def finished(done, name=None):
    """Count and log a running job's move; `name` replaces the event's own (reaped)."""
    job, outcome, status = done.job, done.outcome, done.status
    labels = {"type": job.type, "queue": job.queue}
    tags = {"attempt": job.attempt, "worker_id": job.lease_owner, "status": status}
    if outcome.status == S.RELEASED:  # it never ran: no duration, no failure
        metrics.count("conveyor_attempts_released", **labels)
        if status == S.CANCELLED:
            metrics.count("conveyor_jobs_cancelled", **labels)
        event(logging.INFO, "released", job, f"attempt {job.attempt} {outcome.error_message}; "
              f"{status}", **tags)
        return
    if done.duration_s is not None:
        metrics.observe_duration(done.duration_s, **labels)
    if outcome.status == S.SUCCEEDED:
        metrics.count("conveyor_jobs_succeeded", **labels)
        event(logging.INFO, name or "succeeded", job,
              f"attempt {job.attempt} succeeded in {done.duration_s or 0:.3f}s", **tags)
        return
    if outcome.status != S.CANCELLED:
        metrics.count("conveyor_attempts_failed", outcome=outcome.status, **labels)
    ending = f"attempt {job.attempt} {outcome.status}: {outcome.error}"
    if status == S.RETRYABLE:
        delay = done.retry_in_s or 0.0
        event(logging.WARNING, name or "retrying", job, f"{ending}; retrying in {delay:.3f}s",
              delay_s=round(delay, 3), **tags)
    elif status == S.DEAD:
        metrics.count("conveyor_jobs_dead", reason=done.dead_reason, **labels)
        event(logging.ERROR, name or "dead", job,
              f"{ending}; dead-lettered ({done.dead_reason})", **tags)
    else:
        metrics.count("conveyor_jobs_cancelled", **labels)
        event(logging.INFO, name or "cancelled", job, f"{ending}; job cancelled", **tags)
