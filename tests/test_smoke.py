"""The shortest path a user takes: submit a job, a supervisor runs it, the history shows it."""
import json

from conftest import side_effects


def test_submitted_job_runs_once_and_is_recorded(conveyor, effects_log):
    job_id = conveyor.submit("t.noop", {"log": effects_log})
    conveyor.start_supervisor(concurrency=2)
    job = conveyor.wait_for_status(job_id, "succeeded")
    assert job.result == {"job": job_id}
    [attempt] = conveyor.attempts(job_id)
    assert (attempt.number, attempt.status, attempt.fenced) == (1, "succeeded", False)
    assert [line[:3] for line in side_effects(effects_log)] == [["run", str(job_id), "1"]]


def test_cli_submit_and_show(conveyor):
    job_id = int(conveyor.flask("jobs", "submit", "t.noop", "--payload", '{"a": 1}').stdout)
    shown = json.loads(conveyor.flask("jobs", "show", str(job_id), "--json").stdout)
    assert shown["id"] == job_id and shown["status"] == "available" and shown["attempts"] == []
