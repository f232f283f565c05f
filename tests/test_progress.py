"""ctx.progress (SPEC §12): a handler's latest JSON value is the job's `progress`, visible in
GET /v1/jobs/{id} while it runs and after it ends; a handler may report in a tight loop and
cost the database a write about once a second, the last value never lost; only the attempt
holding the job's lease writes it; `flask jobs wait` and the Python client show it.

The writes are counted by the database itself: the test installs a trigger that records
every UPDATE of jobs.progress (the independent record), then compares it with what the
handler reported and what /metrics says the workers wrote."""
import os
import re
import subprocess
import sys

import pytest

from apiserver import api, gunicorn  # noqa: F401 (fixtures)
from checks import LONG_LEASE, gate_path, release
from client import Conveyor
from conftest import ROOT, wait_for
from core import jobs, keys, workers
from core.policy import Outcome
from models import db, is_postgres

RECORD_WRITES_SQLITE = [
    "CREATE TABLE test_progress_writes (job_id BIGINT, progress TEXT)",
    """CREATE TRIGGER test_progress_written AFTER UPDATE OF progress ON jobs
       BEGIN INSERT INTO test_progress_writes VALUES (NEW.id, NEW.progress); END""",
]
RECORD_WRITES_POSTGRES = [
    "DROP TRIGGER IF EXISTS test_progress_written ON jobs",
    "DROP TABLE IF EXISTS test_progress_writes",
    "CREATE TABLE test_progress_writes (job_id BIGINT, progress TEXT)",
    """CREATE OR REPLACE FUNCTION test_progress_write() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN INSERT INTO test_progress_writes VALUES (NEW.id, NEW.progress); RETURN NULL; END
       $$""",
    """CREATE TRIGGER test_progress_written AFTER UPDATE OF progress ON jobs
       FOR EACH ROW EXECUTE FUNCTION test_progress_write()""",
]


@pytest.fixture
def progress_writes(conveyor):
    """Every write of jobs.progress, as the database saw it: [(job_id, progress JSON)]."""
    for statement in RECORD_WRITES_POSTGRES if is_postgres() else RECORD_WRITES_SQLITE:
        db.execute_sql(statement)

    def writes(job_id):
        return [progress for (progress,) in db.execute_sql(
            "SELECT progress FROM test_progress_writes WHERE job_id = %s" if is_postgres()
            else "SELECT progress FROM test_progress_writes WHERE job_id = ?",
            (job_id,)).fetchall()]
    yield writes
    db.execute_sql("DROP TRIGGER IF EXISTS test_progress_written" + (" ON jobs" if is_postgres() else ""))
    db.execute_sql("DROP TABLE IF EXISTS test_progress_writes")
    if is_postgres():
        db.execute_sql("DROP FUNCTION IF EXISTS test_progress_write()")


def shown(api, key, job_id):
    response = api.call("GET", f"/v1/jobs/{job_id}", key)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def metric_total(api, key, name):
    """The sum of a counter's series on GET /metrics."""
    text = api.call("GET", "/metrics", key).get_data(as_text=True)
    return sum(float(value) for value in re.findall(rf"(?m)^{name}\{{[^}}]*\}} (\S+)$", text))


def test_ten_thousand_reports_in_a_second_cost_a_few_writes_and_the_last_value_stays(
        api, progress_writes):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    job_id = conveyor.submit("t.progress", {"n": 10_000, "over_s": 1.0})
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)

    job = conveyor.wait_for_status(job_id, "succeeded", timeout=30)

    assert job.result["reported"] == 10_000 and job.result["took_s"] < 2.0
    last = {"done": 9_999, "total": 10_000}
    assert shown(api, admin, job_id)["progress"] == last
    writes = progress_writes(job_id)
    # At once, about once a second after (the next report or the heartbeat), and at the end.
    assert 2 <= len(writes) <= 4, writes
    assert writes[0] == '{"done":0,"total":10000}' and writes[-1] == '{"done":9999,"total":10000}'
    wait_for(lambda: metric_total(api, admin, "conveyor_progress_writes_total") == len(writes),
             timeout=10, message="/metrics to count the writes the database saw")


def test_progress_is_visible_while_the_job_runs_and_after_it_ends(api, tmp_path,
                                                                    progress_writes):
    conveyor, key = api.conveyor, api.key("app")
    gate = gate_path(tmp_path)
    job_id = api.submit(key, {"type": "t.progress", "payload": {
        "values": [{"done": 1, "total": 3}, {"done": 2, "total": 3}], "gate": gate,
        "after": [{"done": 3, "total": 3}]}})["id"]
    assert api.submit(key, {"type": "t.noop"})["progress"] is None
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)

    # The first report is written at once; the second, which no report follows, by the
    # heartbeat about a second later, while the handler waits at its gate.
    first = wait_for(lambda: shown(api, key, job_id)["progress"] is not None
                     and shown(api, key, job_id), timeout=10, message="the first progress")
    assert first["status"] == "running" and first["progress"] in (
        {"done": 1, "total": 3}, {"done": 2, "total": 3})
    running = wait_for(lambda: (document := shown(api, key, job_id))["progress"] == {
        "done": 2, "total": 3} and document, timeout=5, message="the pending progress")
    assert running["status"] == "running"

    release(gate, 1)
    ended = conveyor.wait_for_status(job_id, "succeeded", timeout=10)
    assert ended.progress == {"done": 3, "total": 3}
    assert shown(api, key, job_id)["progress"] == {"done": 3, "total": 3}
    assert progress_writes(job_id) == ['{"done":1,"total":3}', '{"done":2,"total":3}',
                                       '{"done":3,"total":3}']


@pytest.mark.parametrize("bad", ["object", "nan", "set"])
def test_a_value_that_is_not_json_fails_the_attempt_saying_so(conveyor, bad):
    job_id = conveyor.submit("t.progress", {"bad": bad}, max_attempts=1)
    conveyor.start_supervisor(concurrency=1)

    job = conveyor.wait_for_status(job_id, "dead", timeout=20)

    [attempt] = conveyor.attempts(job_id)
    assert attempt.error_type == "TypeError"
    assert attempt.error_message.startswith("ctx.progress takes a JSON-serialisable value: ")
    assert job.progress is None


def test_only_the_attempt_holding_the_lease_writes_progress(conveyor):
    job_id = conveyor.submit("t.noop")
    worker = workers.WorkerInfo(id="w-1", supervisor_id="s-1", host="here", pid=1)
    [claimed] = jobs.claim(worker)

    assert jobs.save_progress(claimed, '{"done":1}')
    assert not jobs.save_progress(claimed._replace(lease_owner="w-other"), '{"done":2}')
    assert not jobs.save_progress(claimed._replace(attempt=2), '{"done":3}')
    assert conveyor.job(job_id).progress == {"done": 1}
    assert jobs.report(claimed, Outcome("succeeded", result={}))
    assert not jobs.save_progress(claimed, '{"done":4}'), "the attempt ended: no lease"
    assert conveyor.job(job_id).progress == {"done": 1}


def test_flask_jobs_wait_shows_progress_as_it_changes(conveyor, tmp_path):
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.progress", {"values": [{"done": 1}], "gate": gate,
                                            "after": ["all done"]})
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    shown_at = tmp_path / "wait.err"
    with open(shown_at, "w") as stderr:
        waiting = subprocess.Popen([sys.executable, "-m", "flask", "jobs", "wait", str(job_id)],
                                   cwd=ROOT, env={**conveyor.env, "NO_COLOR": "1"},
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        wait_for(lambda: 'progress {"done": 1}' in shown_at.read_text(), timeout=15,
                 message="flask jobs wait to show the first progress")
        release(gate, 1)
        out, _ = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0
    lines = re.findall(r"(?m)^ *\d+\.\ds  (job .*)$", shown_at.read_text())
    assert f'job {job_id} running, attempt 1, progress {{"done": 1}}' in lines
    assert out == f'job {job_id} succeeded, attempt 1, progress "all done"\n'


def test_the_python_client_sees_progress_as_it_changes(conveyor, gunicorn, tmp_path):
    server = gunicorn()
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.progress", {"values": [{"done": 1}], "gate": gate,
                                            "after": [{"done": 2}]})
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    seen = []

    def on_progress(job):
        seen.append(job.progress)
        if job.progress == {"done": 1}:
            release(gate, 1)

    with Conveyor(server.url, keys.create("app", "admin")[1]) as client:
        job = client.wait(job_id, timeout=30, on_progress=on_progress)
        assert client.get(job_id).progress == {"done": 2}
    assert (job.status, job.progress) == ("succeeded", {"done": 2})
    assert seen == [{"done": 1}, {"done": 2}]
    assert os.path.exists(f"{gate}.1")
