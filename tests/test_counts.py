"""The counts of jobs by queue and status that GET /v1/stats, /metrics and the queues
show: kept as jobs change on PostgreSQL (migrations/0018_job_counts.py), so that reading
them costs the same with ten million jobs in the history as with none; counted in the
table on SQLite. Every way a job is stored, moves or goes must leave them exact."""

import psycopg2
import pytest

from checks import assert_audit_clean
from conftest import in_threads, rules
from core import audit, history, jobs, submission, workers
from core.policy import Outcome
import models
from models import Job


def stored_counts():
    """The truth: the jobs stored, counted."""
    counts = {}
    for queue, status, count in (Job.select(Job.queue, Job.status, models.pw.fn.COUNT(Job.id))
                                 .group_by(Job.queue, Job.status).tuples()):
        counts.setdefault(queue, {})[status] = count
    return counts


def submit(queue, n=1, **fields):
    return [job.id for job, _ in jobs.enqueue([
        submission.validate_submission({"type": "t.noop", "queue": queue, **fields}, rules())
        for _ in range(n)])]


def test_the_counts_follow_every_way_a_job_moves(conveyor):
    worker = workers.WorkerInfo(id="w-counts", supervisor_id="s", host="h", pid=1)
    steps = []

    def check(what):
        steps.append(what)
        assert history.counts_by_queue() == stored_counts(), steps
        assert audit.check_counts() == [], steps

    submit("a", 3)
    submit("b", 2, max_attempts=1)
    submit("a", 1, delay_s=3600)
    check("stored")
    claimed = jobs.claim(worker, limit=4)
    check("claimed")
    first, second, third, fourth = claimed
    assert jobs.report(first, Outcome("succeeded"))
    assert jobs.report(second, Outcome("failed", error_type="E"))
    check("succeeded, and failed to retry or to die")
    dead = third if third.queue == "b" else fourth
    assert jobs.report(dead, Outcome("failed", error_type="E"))
    check("dead")
    jobs.dlq_retry(dead.id)
    check("retried from the dead-letter queue")
    [waiting] = [job.id for job in Job.select().where(Job.status == "scheduled")]
    jobs.cancel(waiting)
    check("cancelled")
    Job.update(finished_at=0).where(Job.status.in_(("succeeded", "cancelled"))).execute()
    assert history.prune(60) == 2
    check("pruned")
    assert history.counts_by_queue("b") == {"b": stored_counts()["b"]}
    history.fold_counts()
    check("folded")


@pytest.mark.postgres
def test_the_counts_of_sessions_that_ended_fold_into_one(pg_conveyor):
    """Each session adds to rows of its own (no worker waits on another's count); those of
    sessions that ended are folded into shard 0, and the sums stay as they were."""
    session = psycopg2.connect(pg_conveyor.database_url)
    with session, session.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [(pid,)] = cursor.fetchall()
        cursor.execute("INSERT INTO jobs (type, queue, payload, run_at, status, max_attempts, "
                       "timeout_s, backoff_base_s, backoff_max_s, created_at) "
                       "SELECT 't.noop', 'elsewhere', '{}', 0, 'available', 1, 1, 1, 1, 0 "
                       "FROM generate_series(1, 3)")
    session.close()
    submit("here", 2)
    shards = lambda: {shard for (shard,) in models.db.execute_sql(  # noqa: E731
        "SELECT shard FROM job_counts").fetchall()}
    assert pid in shards()
    before = history.counts_by_queue()
    assert before == {"elsewhere": {"available": 3}, "here": {"available": 2}}
    from conftest import wait_for
    wait_for(lambda: models.db.execute_sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                           (pid,)).fetchone()[0] == 0,
             message="the other session to end")
    history.fold_counts()
    assert pid not in shards() and 0 in shards()
    assert history.counts_by_queue() == before == stored_counts()


@pytest.mark.postgres
def test_counts_stay_exact_while_workers_and_submitters_race(pg_conveyor):
    """Four workers drain while four threads submit: every session counts at once."""
    supervisor = pg_conveyor.start_supervisor(concurrency=4)
    supervisor.wait_for_workers(4)

    def submitter(queue):
        for _ in range(25):
            submit(queue, 4)
        models.db.close()

    in_threads(submitter, [(f"q{i % 2}",) for i in range(4)])
    ids = [job.id for job in Job.select(Job.id)]
    assert len(ids) == 400
    pg_conveyor.wait_until_final(ids, timeout=60)
    assert history.counts_by_queue() == stored_counts() == {
        "q0": {"succeeded": 200}, "q1": {"succeeded": 200}}
    assert_audit_clean(pg_conveyor)


@pytest.mark.postgres
def test_flask_audit_finds_counts_that_are_wrong(pg_conveyor):
    submit("a", 2)
    models.db.execute_sql("UPDATE job_counts SET count = count + 1 WHERE queue = 'a'")
    result = pg_conveyor.flask("audit", check=False)
    assert result.returncode == 1
    assert "[counts] queue 'a', available: 2 jobs stored, 3 counted" in result.stdout


@pytest.mark.postgres
def test_a_truncated_jobs_table_counts_nothing(pg_conveyor):
    submit("a", 2)
    models.db.execute_sql("TRUNCATE jobs CASCADE")
    assert history.counts_by_queue() == {} and audit.check_counts() == []
