"""The statements a worker sends for every job stay on indexes however its tables grow,
though they are prepared once per connection (PostgreSQL only)."""
import psycopg2
import pytest

import jobs
import models


def plan_of(sql, params):
    """The plan the current session runs for a statement prepared by models.execute."""
    models.execute(sql, params)  # prepared on this connection
    name = models.db.connection().prepared[sql]
    placeholders = ", ".join(["%s"] * len(params))
    rows = models.db.execute_sql(f"EXPLAIN EXECUTE {name}({placeholders})", params).fetchall()
    return "\n".join(row[0] for row in rows)


@pytest.mark.postgres
def test_a_workers_claim_is_planned_for_the_table_as_it_is_now(pg_conveyor):
    """Prepared on a small table and run many times there, the worker's claim must
    not keep a plan made for that table (a full scan) once it holds 200,000 jobs, even
    before any ANALYZE: a worker's session never uses generic plans."""
    models.open_database(pg_conveyor.database_url, lease_s=pg_conveyor.settings.lease_s,
                         custom_plans=True)
    worker = jobs.WorkerInfo(id="w-plans", supervisor_id="s", host="h", pid=1)
    jobs.enqueue([jobs.validate_submission({"type": "t.noop"})] * 100)
    models.db.execute_sql("ANALYZE jobs")  # the statistics of a table of 100 jobs
    sql = jobs._pg_step_sql(0, True, False)
    params = [20, worker.id, worker.host, worker.pid]
    for _ in range(10):  # past the point where the server may switch to a generic plan
        with models.db.atomic() as transaction:
            models.execute(sql, params)
            transaction.rollback()

    with psycopg2.connect(pg_conveyor.database_url) as other, other.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs (type, queue, payload, priority, run_at, max_attempts, timeout_s,"
            " backoff_base_s, backoff_max_s, status, attempt, created_at, finished_at)"
            " SELECT 't.noop', 'default', '{}', 0, 0, 5, 300, 1, 3600, 'succeeded', 1, 0, 1"
            " FROM generate_series(1, 200000)")
    plan = plan_of(sql, params)
    assert "Seq Scan on jobs" not in plan, plan
    assert "jobs_pkey" in plan and "jobs_claim" in plan, plan
