"""SPEC §4.7, a crash costs one attempt: a worker holds a claim of up to WORKER_BATCH
jobs, and when it dies only the attempt whose handler was running pays. The jobs it had
claimed but not begun go back at once with their budget intact, whoever notices the death
first: its supervisor, the worker itself when its supervisor died, or any reaper after the
lease. A poison job that kills its worker never makes another job dead."""
import signal
import threading

import pytest

from core import jobs

from core import submission

from core import workers
from checks import LONG_LEASE, alive, assert_audit_clean, effect_seen
from conftest import wait_for, rules
from models import Attempt, db


def attempts_by_job(job_ids):
    history = {}
    for attempt in (Attempt.select().where(Attempt.job_id.in_(list(job_ids)))
                    .order_by(Attempt.job_id, Attempt.number)):
        history.setdefault(attempt.job_id, []).append(attempt)
    return history


def test_a_poison_job_never_takes_its_claim_into_the_dead_letter_queue(conveyor):
    supervisor = conveyor.start_supervisor(concurrency=1, WORKER_BATCH=20, **LONG_LEASE)
    supervisor.wait_for_workers(1)
    # Poison jobs sit among one-shot jobs, where a claim of a fast worker takes up to 20.
    ids, poison = [], []
    for position in range(160):
        if position in (40, 80, 120):
            poison += conveyor.submit_many("t.crash", [{}], max_attempts=2)
        else:
            ids += conveyor.submit_many("t.noop", [{}], max_attempts=1)
    conveyor.wait_until_final(ids + poison, timeout=90)

    statuses = conveyor.statuses(ids)
    assert set(statuses.values()) == {"succeeded"}, \
        f"{sum(s != 'succeeded' for s in statuses.values())} one-shot jobs did not succeed"
    history = attempts_by_job(ids + poison)
    for job_id in poison:
        job = conveyor.job(job_id)
        counted = [a.status for a in history[job_id] if a.status != "released"]
        assert job.status == "dead" and job.dead_reason == "max_attempts"
        assert counted == ["crashed", "crashed"], history[job_id]
        assert job.attempt - job.attempt_base == 2
    released = [a for job_id in ids for a in history[job_id] if a.status == "released"]
    # Without claims of several jobs this test would prove nothing.
    assert released, "no poison job was claimed together with others"
    for attempt in released:
        assert attempt.error_type == "Released" and attempt.finished_at is not None
        assert "WorkerDied" in attempt.error_message
    for job_id in ids:
        assert history[job_id][-1].status == "succeeded"
        assert conveyor.job(job_id).attempt_base == len(history[job_id]) - 1
    assert_audit_clean(conveyor)


def test_the_reaper_charges_a_lost_claim_one_attempt_and_releases_the_rest(conveyor):
    ids = conveyor.submit_many("t.noop", [{}] * 5, max_attempts=1)
    lost = workers.WorkerInfo(id="w-lost", supervisor_id="s-lost", host="gone", pid=1)
    claimed = jobs.claim(lost, limit=5)
    assert [job.id for job in claimed] == ids

    reaped = jobs.reap_expired(lease_s=0.0)

    assert sorted(job.id for job in reaped) == ids
    history = attempts_by_job(ids)
    first, rest = ids[0], ids[1:]
    assert [a.status for a in history[first]] == ["crashed"]
    assert history[first][0].error_type == "LeaseExpired"
    assert conveyor.job(first).status == "dead"
    for job_id in rest:
        job = conveyor.job(job_id)
        assert [a.status for a in history[job_id]] == ["released"]
        assert (job.status, job.attempt, job.attempt_base) == ("available", 1, 0 + 1)
        assert job.lease_owner is None and job.last_error is None
    # Released jobs are claimable at once and run with their whole budget.
    worker = workers.WorkerInfo(id="w-next", supervisor_id="s-next", host="here", pid=2)
    again = jobs.claim(worker, limit=10)
    assert [job.id for job in again] == rest and {job.attempt for job in again} == {2}
    assert all(jobs.report(job, jobs.Outcome("failed", error_type="E")) for job in again)
    assert {conveyor.job(job_id).status for job_id in rest} == {"dead"}
    assert_audit_clean(conveyor)


@pytest.mark.postgres
def test_concurrent_reapers_charge_a_lost_claim_exactly_once(pg_conveyor):
    conveyor = pg_conveyor
    for round_ in range(10):
        queue = f"round-{round_}"  # this round's claim takes no job of an earlier one
        ids = conveyor.submit_many("t.noop", [{}] * 8, max_attempts=3, queue=queue)
        lost = workers.WorkerInfo(id=f"w-lost-{round_}", supervisor_id="s", host="gone", pid=1,
                               queues=(queue,))
        assert len(jobs.claim(lost, limit=8)) == 8
        barrier = threading.Barrier(4)

        def reap():
            barrier.wait()
            jobs.reap_expired(lease_s=0.0)

        threads = [threading.Thread(target=reap) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(lambda: not any(s == "running" for s in conveyor.statuses(ids).values()),
                 message="every reaper to finish")
        statuses = [a.status for history in attempts_by_job(ids).values() for a in history]
        assert sorted(statuses) == ["crashed"] + ["released"] * 7, statuses
    assert_audit_clean(conveyor)


def test_a_worker_whose_supervisor_dies_gives_back_what_it_had_not_begun(
        conveyor, tmp_path, effects_log):
    supervisor = conveyor.start_supervisor(concurrency=1, WORKER_BATCH=20, LEASE_S=3)
    [worker_pid] = supervisor.wait_for_workers(1)
    go = str(tmp_path / "go")
    # The worker claims one job after a lull, then as many as 20 once it sees they are fast:
    # the claim that holds the blocking job also holds jobs after it, not begun.
    submitted = jobs.enqueue(
        [submission.validate_submission({"type": "t.noop", "max_attempts": 1}, rules())] * 6
        + [submission.validate_submission({"type": "t.wait_file", "max_attempts": 2,
                                     "payload": {"file": go, "log": effects_log}}, rules())]
        + [submission.validate_submission({"type": "t.noop", "max_attempts": 1}, rules())] * 10)
    ids = [job.id for job, _ in submitted]
    before, blocking, after = ids[:6], ids[6], ids[7:]
    effect_seen(effects_log, "start", blocking, 1)
    held_after = [job_id for job_id, status in conveyor.statuses(after).items()
                  if status == "running"]
    assert held_after, "the claim that took the blocking job took none after it"

    supervisor.signal(signal.SIGKILL)  # the supervisor alone: its worker is orphaned
    wait_for(lambda: not alive(worker_pid), timeout=10, message="the orphaned worker to leave")
    # Before any lease expired, the worker reported what it had finished and gave back
    # what it had not begun.
    history = attempts_by_job(before + after)
    assert {a.status for job_id in held_after for a in history[job_id]} == {"released"}
    assert {history[job_id][-1].status for job_id in before} == {"succeeded"}
    assert conveyor.job(blocking).status == "running"

    with open(go, "w"):
        pass
    conveyor.start_supervisor(concurrency=2, LEASE_S=3)
    conveyor.wait_until_final(ids, timeout=60)
    assert set(conveyor.statuses(before + after).values()) == {"succeeded"}
    history = attempts_by_job(ids)
    assert [a.status for a in history[blocking]] == ["crashed", "succeeded"]
    assert history[blocking][0].error_type == "LeaseExpired"
    for job_id in before + after:
        assert "crashed" not in {a.status for a in history[job_id]}, history[job_id]
    assert_audit_clean(conveyor)


@pytest.mark.postgres
def test_a_released_job_claimed_at_once_starts_after_its_release_is_recorded(pg_conveyor):
    # A claim's transaction can begin before the release it then sees commits (its backend
    # waits on a lock, or is descheduled, between the two): the attempt it starts must
    # still begin after the released one was recorded finished (one attempt at a time).
    conveyor = pg_conveyor
    ready, go, claimed = threading.Event(), threading.Event(), []
    taker = workers.WorkerInfo(id="w-taker", supervisor_id="s", host="here", pid=2)

    def claim_when_told():
        jobs.claim(taker)  # nothing yet: this thread's connection prepares the claim
        ready.set()
        go.wait(10)
        claimed.extend(jobs.claim(taker))

    thread = threading.Thread(target=claim_when_told)
    thread.start()
    assert ready.wait(10)
    [job_id] = conveyor.submit_many("t.noop", [{}])
    lost = workers.WorkerInfo(id="w-lost", supervisor_id="s", host="gone", pid=1)
    assert [job.id for job in jobs.claim(lost)] == [job_id]
    with db.atomic():
        db.execute_sql("LOCK TABLE attempts IN ACCESS EXCLUSIVE MODE")
        go.set()
        wait_for(lambda: backend_waits_for_a_lock(conveyor), message="the claim to wait")
        assert jobs.end_attempts(lost.id, jobs.Outcome("crashed", error_type="WorkerDied"))
    thread.join(10)

    assert [job.id for job in claimed] == [job_id]
    released, started = conveyor.attempts(job_id)
    assert (released.status, started.status) == ("released", "running")
    assert started.started_at >= released.finished_at
    assert claimed[0].started_at >= released.finished_at


def backend_waits_for_a_lock(conveyor):
    import psycopg2
    with psycopg2.connect(conveyor.database_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       "AND datname = current_database()")
        return cursor.fetchone()[0] > 0
