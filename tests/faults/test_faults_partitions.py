"""Scenario 4 of the fault-injection harness: a supervisor and its workers cut off from
PostgreSQL by a proxy that black-holes their traffic (sockets stay open, nothing gets
through) for longer than the lease, while they hold jobs. Their jobs run elsewhere after
the lease; when the link returns, their late results are refused and they carry on."""
import os
import signal
import threading
from urllib.parse import urlparse

import pytest

from core import jobs

from core import workers
import models
from checks import (SHORT_LEASE, alive, assert_audit_clean, effect_seen, gate_path,
                    release, running_attempt, stopped)
from conftest import side_effects, wait_for
from harness import partitions, seed
from proxy import PartitionProxy

PARTITION_JOBS = 1500
pytestmark = pytest.mark.postgres

# Where the link is cut: anywhere (most likely between two transactions), or right after
# a heartbeat renewed the lease in a transaction that is not committed yet, so the cut-off
# session still holds the job's row lock.
CUTS = {
    "anywhere": None,
    "inside a transaction": lambda message, previous: b'UPDATE "jobs" SET "heartbeat_at"' in message,
}


@pytest.fixture
def proxy(pg_conveyor):
    where = urlparse(pg_conveyor.database_url)
    proxy = PartitionProxy(where.hostname, where.port or 5432)
    yield proxy
    proxy.close()


def cut_off_supervisor(conveyor, proxy):
    supervisor = conveyor.start_supervisor(
        concurrency=1, DATABASE_URL=proxy.url_for(conveyor.database_url), **SHORT_LEASE)
    [worker] = supervisor.wait_for_workers(1)
    return supervisor, worker


def runs_again_after_the_partition(conveyor, supervisor, worker, effects_log):
    """The cut-off worker reconnected by itself: the same process runs new jobs."""
    assert supervisor.worker_pids() == [worker] and alive(worker)
    ids = conveyor.submit_many("t.noop", [{"log": effects_log}] * 3)
    conveyor.wait_until_final(ids, timeout=30)
    for job_id in ids:
        [attempt] = conveyor.attempts(job_id)
        assert attempt.status == "succeeded" and attempt.pid == worker


@pytest.mark.parametrize("cut", list(CUTS))
def test_cut_off_workers_job_runs_elsewhere_and_its_late_result_is_refused(
        pg_conveyor, proxy, effects_log, tmp_path, cut):
    cut_off, cut_off_worker = cut_off_supervisor(pg_conveyor, proxy)
    gate = gate_path(tmp_path)
    job_id = pg_conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log})
    assert running_attempt(pg_conveyor, job_id, 1).pid == cut_off_worker
    effect_seen(effects_log, "start", job_id, 1)
    other = pg_conveyor.start_supervisor(concurrency=1, **SHORT_LEASE)
    [other_worker] = other.wait_for_workers(1)

    if CUTS[cut] is None:
        proxy.cut()
    else:
        proxy.cut_after(CUTS[cut])
        wait_for(lambda: proxy.partitioned, message="the cut inside a transaction")
    release(gate, 1)  # the cut-off attempt finishes; its outcome cannot get through
    effect_seen(effects_log, "end", job_id, 1)

    job = pg_conveyor.wait_for_status(job_id, "succeeded", timeout=30)
    assert proxy.partitioned, "the job must run elsewhere while the link is still down"
    crashed, retried = pg_conveyor.attempts(job_id)
    assert crashed.status == "crashed" and crashed.error_type == "LeaseExpired"
    assert retried.pid == other_worker and job.result == {"attempt": 2, "pid": other_worker}
    proxy.heal()

    late = wait_for(lambda: pg_conveyor.attempts(job_id)[0].fenced and pg_conveyor.attempts(job_id)[0],
                    timeout=30, message="the late outcome to be refused")
    assert late.status == "crashed" and late.finished_at == crashed.finished_at
    after = pg_conveyor.job(job_id)
    for name in ("status", "attempt", "result", "finished_at"):
        assert getattr(after, name) == getattr(job, name), name
    other.stop(grace_s=10)
    runs_again_after_the_partition(pg_conveyor, cut_off, cut_off_worker, effects_log)
    assert_audit_clean(pg_conveyor)


def test_claim_answered_after_its_lease_expired_does_not_run_the_job(pg_conveyor, proxy,
                                                                     effects_log):
    cut_off, cut_off_worker = cut_off_supervisor(pg_conveyor, proxy)
    # The claim commits, and the link goes down before the worker hears of it. The worker
    # claims all the time (finding nothing); the first claim the server gets after the job
    # is stored is the one that takes it.
    stored = threading.Event()
    any_worker = workers.WorkerInfo(id="w", supervisor_id="s", host="h", pid=1)  # no queues either
    claim = models.statement_name(jobs.claim_statement(any_worker)[0]).encode()  # prepared
    proxy.cut_after(lambda message, previous: stored.is_set() and message.startswith(b"Q")
                    and b"EXECUTE " + claim in message)
    # Held still while the job is stored: its NOTIFY would wake the worker at once, and a
    # claim the proxy passed on before `stored` is set could take the job uncut.
    os.kill(cut_off_worker, signal.SIGSTOP)
    wait_for(lambda: stopped(cut_off_worker), message="the worker to stop")
    job_id = pg_conveyor.submit("t.noop", {"log": effects_log})
    stored.set()
    os.kill(cut_off_worker, signal.SIGCONT)
    wait_for(lambda: proxy.partitioned, message="the cut after a claim")
    assert running_attempt(pg_conveyor, job_id, 1).pid == cut_off_worker
    other = pg_conveyor.start_supervisor(concurrency=1, **SHORT_LEASE)
    [other_worker] = other.wait_for_workers(1)

    pg_conveyor.wait_for_status(job_id, "succeeded", timeout=30)
    crashed, retried = pg_conveyor.attempts(job_id)
    assert crashed.status == "crashed" and crashed.error_type == "LeaseExpired"
    assert retried.pid == other_worker
    proxy.heal()
    other.stop(grace_s=10)

    runs_again_after_the_partition(pg_conveyor, cut_off, cut_off_worker, effects_log)
    # The late answer to the claim came after the lease was gone: the job, succeeded
    # elsewhere meanwhile, must not run again.
    assert [line[:3] for line in side_effects(effects_log) if line[1] == str(job_id)] == [
        ["run", str(job_id), "2"]]
    assert pg_conveyor.job(job_id).attempt == 2
    assert_audit_clean(pg_conveyor)


@pytest.mark.slow
def test_partitioned_supervisors_jobs_are_neither_lost_nor_run_twice(pg_conveyor):
    figures = partitions(pg_conveyor, PARTITION_JOBS, seed())
    print(figures.line())
    assert figures.clean, figures.report()
    assert figures.partitions >= 1 and figures.fenced >= 1, figures.line()


def test_reaper_passes_over_a_job_locked_by_a_cut_off_session(pg_conveyor):
    import threading

    from core import jobs
    import psycopg2
    job_id = pg_conveyor.submit("t.noop")
    [job] = jobs.claim(workers.WorkerInfo(id="w-cut-off", supervisor_id="s-gone", host="h", pid=1))
    # The worker's session is stuck inside a transaction that holds the job's row.
    cut_off = psycopg2.connect(pg_conveyor.database_url)
    with cut_off.cursor() as cur:
        cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
    try:
        wait_for(lambda: jobs.db_time() - job.started_at > 0.1, message="the lease to expire")
        reaped = []
        reaper = threading.Thread(target=lambda: reaped.append(jobs.reap_expired(lease_s=0.1)),
                                  daemon=True)
        reaper.start()
        reaper.join(5)
        assert not reaper.is_alive(), "the reaper waited on the locked row"
        assert reaped == [[]] and pg_conveyor.job(job_id).status == "running"
    finally:
        cut_off.close()  # the server ends the session (the lease-long idle timeout, in life)
    # The server ends that session, and lets go of the row, a moment after the close.
    [taken] = wait_for(lambda: jobs.reap_expired(lease_s=0.1), message="the job to be reaped")
    assert taken.id == job_id and pg_conveyor.job(job_id).status in ("retryable", "available")
