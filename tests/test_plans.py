"""The statements a worker sends for every job stay on indexes however its tables grow:
on PostgreSQL though they are prepared once per connection, on SQLite though its planner
takes a partial index only for a condition that spells out the index's own predicate."""
import psycopg2
import pytest

from core import jobs
from core.policy import Outcome

from core import submission

from core import workers
import models
from conftest import Conveyor, rules


def fill_attempts(database_url, count=20000):
    """Give `count` of the history's jobs a succeeded attempt, from another session."""
    with psycopg2.connect(database_url) as other, other.cursor() as cursor:
        cursor.execute(
            "INSERT INTO attempts (job_id, number, status, worker_id, host, pid, started_at,"
            " finished_at) SELECT id, 1, 'succeeded', 'w', 'h', 1, 0, 1 FROM jobs"
            " WHERE status = 'succeeded' ORDER BY id LIMIT %s", (count,))


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


def plans_run_by(sql, params):
    """The plans the server runs for a statement prepared by models.execute, those of the
    statements inside the functions it calls included (auto_explain, sent to this session
    as notices); the statement's work is rolled back."""
    connection = models.db.connection()
    for statement in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                      "SET auto_explain.log_nested_statements = on",
                      "SET auto_explain.log_level = notice"):
        models.db.execute_sql(statement)
    del connection.notices[:]
    with models.db.atomic() as transaction:
        models.execute(sql, params)
        transaction.rollback()
    models.db.execute_sql("SET auto_explain.log_min_duration = -1")
    return "\n".join(connection.notices)


@pytest.mark.postgres
@pytest.mark.parametrize("queues", [(), ("default",), ("default", "mail")])
def test_a_workers_step_stays_on_indexes_as_the_tables_grow(pg_conveyor, queues):
    """The worker's step (its reports and its next claim), run many times on small tables,
    must not keep a plan made for them (a full scan) once `jobs` holds 200,000 jobs and
    more than 10,000 attempts, before any ANALYZE. Its functions keep their plans for the
    session (migrations/0014_generic_claim_plans.py), so the plans they keep must be the
    ones that read indexes."""
    models.open_database(pg_conveyor.database_url, lease_s=pg_conveyor.settings.lease_s,
                         custom_plans=True)
    worker = workers.WorkerInfo(id="w-plans", supervisor_id="s", host="h", pid=1,
                                queues=queues)
    jobs.enqueue([submission.validate_submission({"type": "t.noop"}, rules())] * 100)
    models.db.execute_sql("ANALYZE")  # the statistics of small tables
    claimed = jobs.claim(worker, limit=20)
    reports = [jobs.Report(job, Outcome(status="succeeded")) for job in claimed[:10]]
    sql, params = jobs.step_statement(worker, reports, limit=20)
    for _ in range(10):  # past the point where the server may switch to a generic plan
        plans_run_by(sql, params)

    fill_history(pg_conveyor.database_url)
    fill_attempts(pg_conveyor.database_url)
    plans = plans_run_by(sql, params)
    assert "Seq Scan on jobs" not in plans and "Seq Scan on attempts" not in plans, plans
    assert ("jobs_claim_by_queue" if queues else "jobs_claim") in plans, plans
    assert "jobs_pkey" in plans and "attempts_job_id_number_key" in plans, plans


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


@pytest.mark.postgres
def test_a_steps_record_reads_only_the_jobs_it_reports_on(pg_conveyor):
    """However many jobs other workers run, a step reaches the jobs it reports on by their
    ids (jobs_pkey). Its record's plan is kept for the session; made when few jobs ran, it
    read every running job through jobs_running and matched each against every report,
    so each step cost more the more ran anywhere (migrations/0019_steps_read_by_id.py)."""
    models.open_database(pg_conveyor.database_url, lease_s=pg_conveyor.settings.lease_s,
                         custom_plans=True)
    me, others = (workers.WorkerInfo(id=f"w-{name}", supervisor_id="s", host="h", pid=1,
                                     queues=()) for name in ("me", "others"))
    jobs.enqueue([submission.validate_submission({"type": "t.noop"}, rules())] * 600)
    claimed = jobs.claim(me, limit=20)
    reports = [jobs.Report(job, Outcome(status="succeeded")) for job in claimed]
    sql, params = jobs.step_statement(me, reports, limit=20)
    for _ in range(10):  # past the point where the server may switch to a generic plan
        plans_run_by(sql, params)
    assert len(jobs.claim(others, limit=500)) == 500
    plans = plans_run_by(sql, params)
    assert "jobs_running" not in plans, plans
    assert "Index Scan using jobs_pkey on jobs" in plans, plans


@pytest.mark.postgres
def test_a_claim_under_a_limit_reads_only_the_jobs_of_the_places_it_looks_at(pg_conveyor):
    """Whether a place of a concurrency limit is still held is asked of its claim's jobs,
    by id, however many jobs run elsewhere (migrations/0019_steps_read_by_id.py)."""
    import handlers
    from conftest import ROOT
    from core import flow
    from core.store import postgres
    handlers.load([f"{ROOT}/tests/flow_handlers"])  # flow.capped: 3 at once
    models.open_database(pg_conveyor.database_url, lease_s=pg_conveyor.settings.lease_s,
                         custom_plans=True)
    me, holder, others = (workers.WorkerInfo(id=f"w-{name}", supervisor_id="s", host="h",
                                             pid=1, queues=())
                          for name in ("me", "holder", "others"))
    new = submission.validate_submission
    jobs.enqueue([new({"type": "flow.capped", "payload": {"log": "/dev/null"}}, rules())] * 40
                 + [new({"type": "t.noop"}, rules())] * 500)
    assert len(jobs.claim(others, limit=500)) == 500  # the unlimited jobs, running
    held, _ = jobs.step(holder, [], 5)  # a place of flow.capped, held by its claim
    assert held and {job.type for job in held} == {"flow.capped"}
    sql = postgres.SQL["step"]
    params = postgres._step_params(me, [], 5, limits=flow.type_limits(), guard=flow.RATE_GUARD)
    for _ in range(10):  # past the point where the server may switch to a generic plan
        plans = plans_run_by(sql, params)
    assert "FROM unnest(p_job_ids, p_attempts)" in plans, plans  # a place was looked at
    assert "jobs_running" not in plans and "Seq Scan on jobs" not in plans, plans
    assert "Index Scan using jobs_pkey on jobs holder" in plans, plans
