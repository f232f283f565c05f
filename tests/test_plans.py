"""The statements a worker sends for every job stay on indexes however its tables grow:
on PostgreSQL though they are prepared once per connection, on SQLite though its planner
takes a partial index only for a condition that spells out the index's own predicate."""
import psycopg2
import pytest

from core import jobs

from core import submission

from core import workers
import models
from conftest import Conveyor, rules


def plan_of(sql, params):
    """The plan the current session runs for a statement prepared by models.execute."""
    models.execute(sql, params)  # prepared on this connection
    name, names = models.db.connection().prepared[sql]
    values = [params[n] for n in names]
    placeholders = ", ".join(["%s"] * len(values))
    rows = models.db.execute_sql(f"EXPLAIN EXECUTE {name}({placeholders})", values).fetchall()
    return "\n".join(row[0] for row in rows)


def fill_history(database_url, jobs=200000, analyze=False):
    """Add `jobs` succeeded jobs, from another session, as a long history would."""
    with psycopg2.connect(database_url) as other, other.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs (type, queue, payload, priority, run_at, max_attempts, timeout_s,"
            " backoff_base_s, backoff_max_s, status, attempt, created_at, finished_at)"
            " SELECT 't.noop', 'default', '{}', 0, 0, 5, 300, 1, 3600, 'succeeded', 1, 0, 1"
            " FROM generate_series(1, %s)", (jobs,))
        if analyze:
            cursor.execute("ANALYZE jobs")


@pytest.mark.postgres
def test_a_workers_claim_is_planned_for_the_table_as_it_is_now(pg_conveyor):
    """Prepared on a small table and run many times there, the worker's claim must
    not keep a plan made for that table (a full scan) once it holds 200,000 jobs, even
    before any ANALYZE: a worker's session never uses generic plans."""
    models.open_database(pg_conveyor.database_url, lease_s=pg_conveyor.settings.lease_s,
                         custom_plans=True)
    worker = workers.WorkerInfo(id="w-plans", supervisor_id="s", host="h", pid=1)
    jobs.enqueue([submission.validate_submission({"type": "t.noop"}, rules())] * 100)
    models.db.execute_sql("ANALYZE jobs")  # the statistics of a table of 100 jobs
    sql, params = jobs.claim_statement(worker, limit=20)
    for _ in range(10):  # past the point where the server may switch to a generic plan
        with models.db.atomic() as transaction:
            models.execute(sql, params)
            transaction.rollback()

    fill_history(pg_conveyor.database_url)
    plan = plan_of(sql, params)
    assert "Seq Scan on jobs" not in plan, plan
    assert "jobs_pkey" in plan and "jobs_claim" in plan, plan


@pytest.fixture
def sqlite_conveyor(tmp_path, monkeypatch):
    instance = Conveyor(f"sqlite:///{tmp_path}/conveyor.db", tmp_path, monkeypatch)
    yield instance
    instance.close()


def sqlite_plan_of(sql, params):
    """SQLite's plan for a statement: one line per step ('SCAN jobs', 'SEARCH jobs USING...')."""
    rows = models.db.execute_sql(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    return [row[-1] for row in rows]


@pytest.mark.parametrize("queues, index", [((), "jobs_claim"), (("mail",), "jobs_claim_by_queue")])
def test_a_workers_claim_on_sqlite_reads_the_index_of_waiting_jobs_not_the_history(
        sqlite_conveyor, queues, index):
    """With thousands of finished jobs and a few waiting (statistics fresh from ANALYZE), the
    claim finds its jobs through the partial index of waiting jobs, in the order it takes
    them: never a scan of the whole table, which grows with the history."""
    models.db.execute_sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)"
        " INSERT INTO jobs (type, queue, payload, priority, run_at, max_attempts, timeout_s,"
        " backoff_base_s, backoff_max_s, status, attempt, created_at, finished_at)"
        " SELECT 't.noop', CASE i % 2 WHEN 0 THEN 'default' ELSE 'mail' END, '{}', 0, 0, 5,"
        " 300, 1, 3600, CASE i % 10 WHEN 0 THEN 'dead' ELSE 'succeeded' END, 1, 0, 1 FROM n")
    jobs.enqueue([submission.validate_submission({"type": "t.noop", "queue": queue}, rules())
                  for queue in ("default", "mail") for _ in range(3)])
    models.db.execute_sql("ANALYZE")
    worker = workers.WorkerInfo(id="w-plans", supervisor_id="s", host="h", pid=1, queues=queues)

    plan = sqlite_plan_of(*jobs.claim_statement(worker, limit=20))
    assert any(f"USING INDEX {index}" in line or f"USING COVERING INDEX {index}" in line
               for line in plan), plan
    assert not [line for line in plan if line.startswith("SCAN jobs") and "INDEX" not in line], plan
    assert not [line for line in plan if "TEMP B-TREE" in line], plan  # the index gives the order
    expected = ["mail"] * 3 if queues else ["default"] * 3 + ["mail"] * 3
    assert [job.queue for job in jobs.claim(worker, limit=20)] == expected  # what it plans


@pytest.mark.postgres
@pytest.mark.parametrize("status, index", [("running", "jobs_running"), ("dead", "jobs_status"),
                                           ("available", "jobs_status")])
def test_a_list_by_status_reads_an_index_not_the_history(pg_conveyor, status, index):
    """GET /v1/jobs?status=...: running jobs have no entry in jobs_status (a claim would
    pay for it on every job) and are found through jobs_running; the others through
    jobs_status. Never a scan of 200,000 finished jobs."""
    from core import history
    from models import Job
    fill_history(pg_conveyor.database_url, analyze=True)
    query = Job.select().where(Job.status == status).order_by(Job.id.desc()).limit(51)
    sql, params = query.sql()
    plan = "\n".join(row[0] for row in models.db.execute_sql(f"EXPLAIN {sql}", params))
    assert "Seq Scan on jobs" not in plan and index in plan, plan
    assert history.list_jobs(status=status) == ([], None)
