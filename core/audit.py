"""`flask audit`: check the stored history of every job against the README's guarantees.

Reads only. Each violation names the job, the guarantee it breaks and what was found.
"""
from collections import defaultdict
from dataclasses import dataclass

from models import Attempt, Job
from core import status as S
from core.store import backend

FINISHED_ATTEMPT = tuple(s for s in S.ATTEMPT_STATUSES if s != S.RUNNING)


@dataclass(frozen=True)
class Violation:
    job_id: int
    guarantee: str
    detail: str

    def __str__(self):
        return f"job {self.job_id}: [{self.guarantee}] {self.detail}"


@dataclass
class Report:
    jobs: int = 0
    attempts: int = 0
    violations: list = None

    def __post_init__(self):
        self.violations = self.violations or []


def run(batch=1000):
    """Check every job and its attempts, and the counts kept of them; return a Report."""
    report = Report(violations=check_counts())
    last_id = 0
    while True:
        page = list(Job.select().where(Job.id > last_id).order_by(Job.id).limit(batch))
        if not page:
            return report
        last_id = page[-1].id
        attempts = defaultdict(list)
        for attempt in (Attempt.select().where(Attempt.job_id.in_([j.id for j in page]))
                        .order_by(Attempt.job_id, Attempt.number)):
            attempts[attempt.job_id].append(attempt)
        for job in page:
            report.jobs += 1
            report.attempts += len(attempts[job.id])
            report.violations.extend(check_job(job, attempts[job.id]))


def check_counts():
    """The queues and statuses whose kept count (GET /v1/stats reads them) is not the
    number of jobs stored; job_id 0: no one job is at fault."""
    return [Violation(0, "counts", f"queue {row['queue']!r}, {row['status']}: "
                                   f"{row['stored']} jobs stored, {row['counted']} counted")
            for row in backend().miscounted()]


def check_job(job, attempts):
    """The violations in one job's history (attempts ordered by number)."""
    found = []

    def violation(guarantee, detail):
        found.append(Violation(job.id, guarantee, detail))

    numbers = [a.number for a in attempts]
    if len(set(numbers)) != len(numbers):
        violation("each attempt at most once", f"attempt numbers repeat: {numbers}")
    if numbers != list(range(1, job.attempt + 1)):
        violation("each attempt at most once",
                  f"job says {job.attempt} attempts started, history has numbers {numbers}")

    for earlier, later in zip(attempts, attempts[1:]):
        if earlier.finished_at is None or later.started_at < earlier.finished_at:
            violation("one attempt at a time",
                      f"attempt {later.number} started before attempt {earlier.number} ended")

    running = [a.number for a in attempts if a.status == S.RUNNING]
    if job.status == S.RUNNING:
        if running != numbers[-1:]:
            violation("one attempt at a time",
                      f"job is running but its running attempts are {running}")
    elif running:
        violation("nothing lost", f"job is {job.status} but attempts {running} are still running")
    for attempt in attempts:
        if (attempt.status in FINISHED_ATTEMPT) != (attempt.finished_at is not None):
            violation("nothing lost",
                      f"attempt {attempt.number} is {attempt.status} with finished_at "
                      f"{attempt.finished_at}")
        if attempt.fenced and attempt.status in (S.SUCCEEDED, S.RUNNING):
            violation("fencing", f"attempt {attempt.number} was fenced yet is {attempt.status}")

    succeeded = [a.number for a in attempts if a.status == S.SUCCEEDED]
    if job.status == S.SUCCEEDED and succeeded != numbers[-1:]:
        violation("succeeded is final",
                  f"job succeeded but its succeeded attempts are {succeeded} of {numbers}")
    if job.status != S.SUCCEEDED and succeeded:
        violation("succeeded is final",
                  f"job is {job.status} after attempt {succeeded[0]} succeeded")

    if job.status in S.FINAL and job.finished_at is None:
        violation("nothing lost", f"job is {job.status} without a finish time")
    if job.status == S.DEAD and job.dead_reason == "max_attempts" \
            and job.attempt - job.attempt_base < job.max_attempts:
        violation("nothing lost", f"dead after {job.attempt - job.attempt_base} of "
                                  f"{job.max_attempts} attempts")
    return found
