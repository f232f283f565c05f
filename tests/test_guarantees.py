"""SPEC §4 under load and under fire: many workers competing for jobs, `kill -9` of a
worker, of a supervisor and of a whole host, and a stalled worker whose lease expired.
Every test ends with the real `flask audit` finding the history clean."""
import os
import signal
from collections import Counter

import pytest

from core import jobs

from core import workers
from models import Attempt
from checks import (LONG_LEASE, SHORT_LEASE, alive, assert_audit_clean,
                    assert_each_effect_once, assert_one_attempt_at_a_time, attempt_status,
                    effect_seen, gate_path, log_line, release, running_attempt, stopped)
from conftest import FAST_ENV, WITH_PGBOUNCER, side_effects, wait_for

# Every guarantee holds through a transaction-pooling pgbouncer too (SPEC §13).
pytestmark = pytest.mark.parametrize("database_url", WITH_PGBOUNCER, indirect=True)

HEARTBEAT_S = float(FAST_ENV["HEARTBEAT_S"])


@pytest.mark.slow
def test_eight_workers_run_each_of_2000_jobs_exactly_once(conveyor, effects_log):
    # A lease expiring while eight workers saturate SQLite's one write lock would be a
    # legitimate at-least-once re-run; this test is about runs without faults.
    supervisors = [conveyor.start_supervisor(concurrency=4, **LONG_LEASE) for _ in range(2)]
    worker_pids = [set(s.wait_for_workers(4)) for s in supervisors]
    ids = conveyor.submit_many("t.noop", [{"log": effects_log}] * 2000)

    conveyor.wait_until_final(ids, timeout=240)

    assert set(conveyor.statuses(ids).values()) == {"succeeded"}
    runs = assert_each_effect_once(effects_log)
    assert runs == Counter({job_id: 1 for job_id in ids}), "a job ran zero or several times"
    attempts = list(Attempt.select().where(Attempt.job_id.in_(ids))
                    .order_by(Attempt.job_id, Attempt.number))
    assert len(attempts) == len(ids)
    assert {(a.number, a.status, a.fenced) for a in attempts} == {(1, "succeeded", False)}
    by_job = {}
    for attempt in attempts:
        by_job.setdefault(attempt.job_id, []).append(attempt)
    for history in by_job.values():
        assert_one_attempt_at_a_time(history)
    # Both supervisors really competed: each one's workers ran some of the jobs.
    ran_on = {a.pid for a in attempts}
    assert all(ran_on & pids for pids in worker_pids), (ran_on, worker_pids)
    assert ran_on <= set().union(*worker_pids)
    for supervisor in supervisors:
        assert supervisor.proc.poll() is None
        # Nothing went wrong, so nothing may say it did (a renewal racing a report included).
        assert "lease lost" not in supervisor.log() and "reaped" not in supervisor.log()
    assert_audit_clean(conveyor)


def test_killed_worker_attempt_is_crashed_at_once_and_retried(conveyor, effects_log, tmp_path):
    # A lease far longer than the test: only the supervisor seeing its child die can
    # record the crash in time.
    supervisor = conveyor.start_supervisor(concurrency=2, LEASE_S=60)
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log})
    attempt = running_attempt(conveyor, job_id, 1)
    effect_seen(effects_log, "start", job_id, 1)
    assert attempt.pid in supervisor.worker_pids()

    os.kill(attempt.pid, signal.SIGKILL)

    crashed = attempt_status(conveyor, job_id, 1, "crashed", "succeeded", "failed",
                             timeout=5)
    assert crashed.status == "crashed"
    assert crashed.error_type == "WorkerDied" and "SIGKILL" in crashed.error_message
    job = conveyor.wait_for_status(job_id, "succeeded", timeout=10)
    retried = conveyor.attempts(job_id)[1]
    assert job.result == {"attempt": 2, "pid": retried.pid}
    assert retried.pid != attempt.pid and retried.pid in supervisor.worker_pids()
    assert not alive(attempt.pid)
    supervisor.wait_for_workers(2)
    assert [a.status for a in conveyor.attempts(job_id)] == ["crashed", "succeeded"]
    assert [line[:3] for line in side_effects(effects_log)] == [
        ["start", str(job_id), "1"], ["start", str(job_id), "2"], ["end", str(job_id), "2"]]
    assert_one_attempt_at_a_time(conveyor.attempts(job_id))
    assert_audit_clean(conveyor)


def test_killed_host_jobs_are_recovered_by_another_supervisor(conveyor, effects_log, tmp_path):
    doomed = conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    gate = gate_path(tmp_path)
    ids = [conveyor.submit("t.gate", {"gate": f"{gate}-{i}", "hold": [1], "log": effects_log})
           for i in range(2)]
    first = [running_attempt(conveyor, job_id, 1) for job_id in ids]
    assert {a.pid for a in first} == set(doomed.worker_pids())
    for job_id in ids:
        effect_seen(effects_log, "start", job_id, 1)
    survivor = conveyor.start_supervisor(concurrency=2, **SHORT_LEASE)  # its reaper decides
    survivor_pids = survivor.wait_for_workers(2)

    killed_at = jobs.db_time()
    doomed.kill_host()

    for job_id in ids:
        job = conveyor.wait_for_status(job_id, "succeeded", timeout=20)
        crashed, retried = conveyor.attempts(job_id)
        assert crashed.status == "crashed" and crashed.error_type == "LeaseExpired"
        # Recovered through the lease (the last heartbeat was at most HEARTBEAT_S old).
        assert crashed.finished_at >= killed_at + SHORT_LEASE["LEASE_S"] - HEARTBEAT_S - 0.1
        assert retried.status == "succeeded" and retried.pid in survivor_pids
        assert job.result == {"attempt": 2, "pid": retried.pid}
        assert_one_attempt_at_a_time([crashed, retried])
        assert not any(line[:3] == ["end", str(job_id), "1"] for line in side_effects(effects_log))
    for job_id in ids:  # the reaping is one log line per job, from the survivor
        assert f"job {job_id} reaped: attempt 1 crashed: LeaseExpired" in survivor.log()
    assert_audit_clean(conveyor)


def test_orphaned_workers_stop_and_their_job_is_recovered(conveyor, effects_log, tmp_path):
    supervisor = conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log})
    attempt = running_attempt(conveyor, job_id, 1)
    effect_seen(effects_log, "start", job_id, 1)
    orphans = supervisor.wait_for_workers(2)
    assert attempt.pid in orphans
    other = conveyor.start_supervisor(concurrency=1, **SHORT_LEASE)
    other.wait_for_workers(1)

    supervisor.signal(signal.SIGKILL)  # the supervisor alone: its workers live on
    supervisor.wait(10)

    wait_for(lambda: not any(alive(pid) for pid in orphans), timeout=5,
             message="the orphaned workers to stop")
    job = conveyor.wait_for_status(job_id, "succeeded", timeout=20)
    crashed, retried = conveyor.attempts(job_id)
    assert crashed.status == "crashed" and crashed.error_type == "LeaseExpired"
    assert retried.pid in other.worker_pids()
    assert job.result == {"attempt": 2, "pid": retried.pid}
    # The orphan never got to finish its attempt after its supervisor died.
    release(gate, 1)
    assert [line[:3] for line in side_effects(effects_log)] == [
        ["start", str(job_id), "1"], ["start", str(job_id), "2"], ["end", str(job_id), "2"]]
    assert_audit_clean(conveyor)


def _stall_between_heartbeats(conveyor, job_id, pid):
    """SIGSTOP pid just after its heartbeat committed, so it holds no lock while stopped."""
    last = conveyor.job(job_id).heartbeat_at
    wait_for(lambda: conveyor.job(job_id).heartbeat_at != last, interval=0.005,
             message="a heartbeat")
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: stopped(pid), message=f"worker {pid} to stop")


@pytest.mark.parametrize("second_attempt", ["finished", "running"])
def test_stalled_worker_result_is_refused(conveyor, effects_log, tmp_path, second_attempt):
    # Heartbeats 0.5s apart leave room to stall the worker between two of them.
    supervisor = conveyor.start_supervisor(concurrency=2, HEARTBEAT_S=0.5, **SHORT_LEASE)
    gate = gate_path(tmp_path)
    hold = [1, 2] if second_attempt == "running" else [1]
    job_id = conveyor.submit("t.gate", {"gate": gate, "hold": hold, "log": effects_log},
                             timeout_s=600)
    stalled = running_attempt(conveyor, job_id, 1)
    effect_seen(effects_log, "start", job_id, 1)
    _stall_between_heartbeats(conveyor, job_id, stalled.pid)
    try:
        crashed = attempt_status(conveyor, job_id, 1, "crashed", "succeeded", "failed")
        assert crashed.status == "crashed" and crashed.error_type == "LeaseExpired"
        if second_attempt == "finished":
            before = conveyor.wait_for_status(job_id, "succeeded")
        else:
            running_attempt(conveyor, job_id, 2)
            effect_seen(effects_log, "start", job_id, 2)
            before = conveyor.job(job_id)
        assert stopped(stalled.pid), "the stalled worker must still be alive, only stopped"
    finally:
        release(gate, 1)
        os.kill(stalled.pid, signal.SIGCONT)

    effect_seen(effects_log, "end", job_id, 1)
    late = wait_for(lambda: conveyor.attempts(job_id)[0].fenced and conveyor.attempts(job_id)[0],
                    message="the late outcome to be refused")
    assert late.status == "crashed" and late.finished_at == crashed.finished_at
    after = conveyor.job(job_id)
    for field in ("status", "attempt", "result", "lease_owner", "run_at", "finished_at"):
        assert getattr(after, field) == getattr(before, field), field
    log_line(supervisor, "late outcome refused")
    if second_attempt == "running":
        assert after.status == "running" and after.attempt == 2
        release(gate, 2)
        after = conveyor.wait_for_status(job_id, "succeeded")
    retried = conveyor.attempts(job_id)[1]
    assert retried.pid != stalled.pid and not retried.fenced
    assert after.result == {"attempt": 2, "pid": retried.pid}
    assert [a.status for a in conveyor.attempts(job_id)] == ["crashed", "succeeded"]
    assert alive(stalled.pid)  # a refused worker carries on with other jobs
    assert_audit_clean(conveyor)


def test_job_claimed_by_a_lost_answer_is_reaped_though_its_worker_heartbeats(conveyor,
                                                                           effects_log):
    """A claim commits, and the connection breaks before the worker hears of it: the
    worker's lease names the job, but the worker will never run it. Its heartbeat must not
    keep that lease alive; the job is reaped after LEASE_S and run again."""
    supervisor = conveyor.start_supervisor(concurrency=1, **SHORT_LEASE)
    [pid] = supervisor.wait_for_workers(1)
    [worker] = wait_for(lambda: [w for w in workers.live_workers(SHORT_LEASE["LEASE_S"])
                                 if w.pid == pid], message="the worker to register")
    job_id = conveyor.submit("t.noop", {"log": effects_log}, run_at="2100-01-01T00:00:00Z")
    from models import Job
    os.kill(pid, signal.SIGSTOP)  # so that the worker cannot take the job first
    try:
        # kill() returns before the worker has stopped: until it has, it may still poll.
        wait_for(lambda: stopped(pid), message=f"worker {pid} to stop")
        Job.update(run_at=jobs.db_time()).where(Job.id == job_id).execute()
        # The answer the worker never got: the job claimed under its lease, in its name.
        # (The supervisor's stager may hold the job's row a moment as it marks it available,
        # and a claim passes over a locked row: claim until it is taken.)
        lease = workers.WorkerInfo(id=worker.id, supervisor_id=worker.supervisor_id,
                                   host=worker.host, pid=worker.pid)
        [lost] = wait_for(lambda: jobs.claim(lease), message="the job to be claimed")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert lost.id == job_id

    job = conveyor.wait_for_status(job_id, "succeeded", timeout=SHORT_LEASE["LEASE_S"] + 15)
    reaped, retried = conveyor.attempts(job_id)
    assert reaped.status == "crashed" and reaped.error_type == "LeaseExpired"
    assert reaped.finished_at - reaped.started_at >= SHORT_LEASE["LEASE_S"]
    assert retried.status == "succeeded" and retried.pid == pid
    assert [line[:3] for line in side_effects(effects_log)] == [["run", str(job_id), "2"]]
    assert_audit_clean(conveyor)
