"""`flask audit` really finds violations: a real history, audited clean, is corrupted one job
at a time behind the core's back (the only place the tests write to the database directly),
and the audit must name each broken guarantee on the job that breaks it, and only there."""
import json

import peewee as pw
import pytest

from checks import LONG_LEASE, assert_audit_clean
from models import Attempt, Job, db

# Each corruption, applied to a job of the given type and payload, and the guarantee the
# audit must report for it.
CORRUPTIONS = {
    "attempt 2 starts before attempt 1 ended": (
        "t.flaky", {"succeed_on": 2}, "one attempt at a time"),
    "an inserted attempt overlaps the finished one": (
        "t.noop", {}, "one attempt at a time"),
    "a second succeeded attempt": ("t.flaky", {"succeed_on": 2}, "succeeded is final"),
    "a succeeded job is retried": ("t.noop", {}, "succeeded is final"),
    "a running attempt on a finished job": ("t.noop", {}, "nothing lost"),
    "a final job without a finish time": ("t.noop", {}, "nothing lost"),
    "dead before its attempts ran out": ("t.fail", {}, "nothing lost"),
    "an attempt number skipped": ("t.noop", {}, "each attempt at most once"),
    "a fenced attempt that succeeded": ("t.noop", {}, "fencing"),
}


def _corrupt(case, job_id):
    attempts = {a.number: a for a in Attempt.select().where(Attempt.job_id == job_id)}
    first = attempts[1]
    if case == "attempt 2 starts before attempt 1 ended":
        (Attempt.update(started_at=first.finished_at - 0.5)
         .where(Attempt.job_id == job_id, Attempt.number == 2).execute())
    elif case == "an inserted attempt overlaps the finished one":
        Attempt.insert(job_id=job_id, number=2, status="failed", worker_id="w-intruder",
                       started_at=first.started_at, finished_at=first.finished_at).execute()
        Job.update(attempt=2).where(Job.id == job_id).execute()
    elif case == "a second succeeded attempt":
        Attempt.update(status="succeeded").where(Attempt.id == first.id).execute()
    elif case == "a succeeded job is retried":
        Job.update(status="available", finished_at=None).where(Job.id == job_id).execute()
    elif case == "a running attempt on a finished job":
        Attempt.update(status="running", finished_at=None).where(Attempt.id == first.id).execute()
    elif case == "a final job without a finish time":
        Job.update(finished_at=None).where(Job.id == job_id).execute()
    elif case == "dead before its attempts ran out":
        Job.update(max_attempts=5).where(Job.id == job_id).execute()
    elif case == "an attempt number skipped":
        Attempt.update(number=2).where(Attempt.id == first.id).execute()
        Job.update(attempt=2).where(Job.id == job_id).execute()
    elif case == "a fenced attempt that succeeded":
        Attempt.update(fenced=True).where(Attempt.id == first.id).execute()


def test_audit_names_each_violated_guarantee(conveyor):
    cases = list(CORRUPTIONS)
    ids = {case: conveyor.submit(CORRUPTIONS[case][0], CORRUPTIONS[case][1], max_attempts=2)
           for case in cases}
    untouched = conveyor.submit("t.flaky", {"succeed_on": 2})
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    conveyor.wait_until_final([*ids.values(), untouched])
    conveyor.supervisors[0].kill_host()  # nothing may move while we corrupt
    assert_audit_clean(conveyor)

    for case in cases:
        _corrupt(case, ids[case])
    result = conveyor.flask("audit", "--json", check=False)

    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    found = {}
    for violation in report["violations"]:
        found.setdefault(violation["job_id"], set()).add(violation["guarantee"])
    for case in cases:
        assert CORRUPTIONS[case][2] in found.get(ids[case], set()), (case, found.get(ids[case]))
    assert set(found) == set(ids.values()), "only corrupted jobs may be reported"
    assert report["jobs"] == len(cases) + 1
    text = conveyor.flask("audit", check=False)
    assert text.returncode == 1
    assert f"job {ids['a fenced attempt that succeeded']}: [fencing]" in text.stdout
    assert text.stdout.strip().splitlines()[-1].startswith(f"audit: {len(cases) + 1} jobs")


def test_database_refuses_a_second_row_for_one_attempt(conveyor):
    job_id = conveyor.submit("t.noop")
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    conveyor.wait_for_status(job_id, "succeeded")
    [attempt] = conveyor.attempts(job_id)

    with pytest.raises(pw.IntegrityError):
        with db.atomic():
            Attempt.insert(job_id=job_id, number=1, status="running", worker_id="w-twin",
                           started_at=attempt.started_at).execute()
    assert len(conveyor.attempts(job_id)) == 1
    assert_audit_clean(conveyor)
