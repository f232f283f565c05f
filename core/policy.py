"""The retry policy of SPEC §5, pure: where a job goes when its attempt ends, how long it
waits before the next one, and the order a worker runs what it claimed.

Decisions only: no database, no settings, no metrics, no logging, nothing of ours imported
but the status words, so every rule is unit-tested in microseconds (tests/test_policy.py).
core/jobs.py applies these decisions in SQL under the lease that holds the job.
"""
import math
import random
from dataclasses import dataclass
from typing import Any, Optional

from core import status as S


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
    # A succeeded attempt's follow-up jobs (core.submission.NewJob, SPEC §12): created with
    # its success, in the same transaction, or never.
    followups: tuple = ()

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
    refund: bool = False  # the attempt does not count toward max_attempts


def backoff_delay(attempts_used, base_s, max_s, rand=random.random):
    """Exponential backoff with full jitter: random(0, min(max, base * 2**(n-1)))."""
    exponent = min(attempts_used - 1, 1023)  # 2.0 ** 1024 overflows a float
    return rand() * min(max_s, base_s * math.pow(2, exponent))


def next_transition(job, outcome, rand=random.random):
    """The retry policy: where a running job goes when its attempt ends with outcome.
    job needs attempt, attempt_base, max_attempts, backoff_base_s and backoff_max_s."""
    if outcome.status == S.SUCCEEDED:
        return Transition(S.SUCCEEDED)
    if outcome.status == S.CANCELLED:
        return Transition(S.CANCELLED)
    if outcome.status == S.RELEASED:
        return Transition(S.AVAILABLE, refund=True)
    if outcome.permanent:
        return Transition(S.DEAD, dead_reason="permanent")
    attempts_used = job.attempt - job.attempt_base
    if attempts_used >= job.max_attempts:
        return Transition(S.DEAD, dead_reason="max_attempts")
    if outcome.retry_in is not None:
        return Transition(S.RETRYABLE, delay_s=outcome.retry_in)
    if outcome.status == S.INTERRUPTED:
        return Transition(S.RETRYABLE, delay_s=0.0)
    return Transition(S.RETRYABLE, delay_s=backoff_delay(
        attempts_used, job.backoff_base_s, job.backoff_max_s, rand))


def released_outcome(why):
    """The outcome of a claimed attempt whose handler never began: the job goes back to
    `available` at once with its attempt budget intact."""
    return Outcome(S.RELEASED, error_type="Released",
                   error_message=f"claimed but not started: {why}; it does not count")


def run_order(job):
    """The order in which a worker runs the jobs of one claim: lower priority first, then
    the earliest due, then the first submitted."""
    return (job.priority, job.run_at, job.id)
