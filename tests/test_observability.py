"""Metrics and logs (the operability issue): /metrics agrees with the database however
many web and worker processes counted, and every job event is one log line."""
import json
import os

import requests
from prometheus_client.parser import text_string_to_metric_families

from core import jobs

from core import workers
from infra import metrics
from apiserver import admin_key, bearer, gunicorn  # noqa: F401 (fixtures)
from conftest import wait_for
from models import Attempt, Job, MetricCounter
from web import exposition


def scrape(server, key):
    response = requests.get(f"{server.url}/metrics", headers=bearer(key), timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_sum_every_web_and_worker_process(conveyor, gunicorn, tmp_path):
    """Two gunicorn workers take the submissions, two supervisors x two workers run them;
    every scrape, whichever gunicorn worker answers, shows the database's totals."""
    key = admin_key(conveyor)
    server = gunicorn(workers=2, RATE_LIMIT="1000/second")
    for _ in range(2):
        conveyor.start_supervisor(concurrency=2).wait_for_workers(2)
    bodies = ([{"type": "t.noop"}] * 12
              + [{"type": "t.flaky", "payload": {"succeed_on": 2}}] * 4
              + [{"type": "t.permanent"}] * 3
              + [{"type": "t.fail", "max_attempts": 2, "queue": "risky"}] * 2)
    ids = []
    with requests.Session() as http:
        for body in bodies:
            response = http.post(f"{server.url}/v1/jobs", json=body, headers=bearer(key), timeout=10)
            assert response.status_code == 201
            ids.append(response.json()["id"])
    conveyor.wait_until_final(ids)

    attempts = list(Attempt.select(Attempt, Job.type, Job.queue).join(
        Job, on=(Job.id == Attempt.job_id)).objects())

    def settled():
        samples = scrape(server, key)
        done = value(samples, "conveyor_attempt_duration_seconds_count", type="t.fail",
                     queue="risky") == 4 and sum(
            v for (name, _), v in samples.items()
            if name == "conveyor_attempt_duration_seconds_count") == len(attempts)
        # The web processes flush their counts on their own clock, the workers on theirs.
        submitted = sum(v for (name, _), v in samples.items()
                        if name == "conveyor_jobs_submitted_total")
        return done and submitted == len(bodies) and samples
    samples = wait_for(settled, timeout=20, interval=0.2, message="the counts to be flushed")

    assert value(samples, "conveyor_jobs_submitted_total", type="t.noop", queue="default") == 12
    assert value(samples, "conveyor_jobs_submitted_total", type="t.fail", queue="risky") == 2
    assert value(samples, "conveyor_jobs_succeeded_total", type="t.noop", queue="default") == 12
    assert value(samples, "conveyor_jobs_succeeded_total", type="t.flaky", queue="default") == 4
    assert value(samples, "conveyor_attempts_failed_total", type="t.flaky", queue="default",
                 outcome="failed") == 4
    assert value(samples, "conveyor_jobs_dead_total", type="t.permanent", queue="default",
                 reason="permanent") == 3
    assert value(samples, "conveyor_jobs_dead_total", type="t.fail", queue="risky",
                 reason="max_attempts") == 2
    assert value(samples, "conveyor_jobs", queue="risky", status="dead") == 2
    assert value(samples, "conveyor_workers_alive") == 4
    # Each gunicorn worker answers alike: the numbers come from the database, not memory.
    for _ in range(6):
        again = scrape(server, key)
        assert value(again, "conveyor_jobs_succeeded_total", type="t.noop", queue="default") == 12
    processes = {row.process_id for row in MetricCounter.select(MetricCounter.process_id)}
    assert len(processes) >= 3  # at least two worker processes and one web process counted


def test_reaped_attempts_and_rate_limits_are_counted(conveyor, gunicorn):
    key = admin_key(conveyor)
    slow = conveyor.flask("keys", "create", "slow", "--rate-limit", "2/minute").stdout.strip()
    server = gunicorn(workers=1)
    for _ in range(3):
        requests.get(f"{server.url}/v1/jobs", headers=bearer(slow), timeout=10)
    job_id = conveyor.submit("t.noop")
    worker = workers.WorkerInfo(id="w-gone", supervisor_id="s-gone", host="lost", pid=1)
    [claimed] = jobs.claim(worker)
    assert claimed.id == job_id
    [reaped] = jobs.reap_expired(lease_s=0.0)
    metrics.flush()
    samples = wait_for(lambda: (s := scrape(server, key)) and value(
        s, "conveyor_rate_limited_total", limit="api_key") >= 1 and s, timeout=10,
        message="the web process to flush its 429")
    assert value(samples, "conveyor_rate_limited_total", limit="api_key") == 1
    assert value(samples, "conveyor_attempts_reaped_total", type="t.noop", queue="default") == 1
    assert value(samples, "conveyor_attempts_failed_total", type="t.noop", queue="default",
                 outcome="crashed") == 1


def test_discarding_a_dead_job_counts_as_a_cancellation(conveyor, gunicorn):
    """A discarded dead job becomes cancelled, so conveyor_jobs_cancelled counts it whether
    the API or `flask dlq discard` discarded it."""
    key = admin_key(conveyor)
    server = gunicorn(workers=1)
    by_api, by_cli = [conveyor.submit("t.permanent", queue="risky") for _ in range(2)]
    conveyor.start_supervisor(concurrency=1)
    conveyor.wait_until_final([by_api, by_cli])
    assert conveyor.statuses([by_api, by_cli]) == {by_api: "dead", by_cli: "dead"}

    response = requests.delete(f"{server.url}/v1/dlq/{by_api}", headers=bearer(key), timeout=10)
    assert response.status_code == 200, response.text
    conveyor.flask("dlq", "discard", str(by_cli))

    samples = wait_for(lambda: (s := scrape(server, key)) and value(
        s, "conveyor_jobs_cancelled_total", type="t.permanent", queue="risky") >= 2 and s,
        timeout=10, message="both discards to be counted")
    assert value(samples, "conveyor_jobs_cancelled_total", type="t.permanent", queue="risky") == 2
    assert value(samples, "conveyor_jobs", queue="risky", status="cancelled") == 2
    assert value(samples, "conveyor_jobs", queue="risky", status="dead") == 0


def test_retiring_old_processes_keeps_every_sum(conveyor):
    for process in ("old-a", "old-b", "current"):
        MetricCounter.insert(process_id=process, name="conveyor_jobs_submitted",
                             labels=json.dumps(["t.noop", "default"]), value=5,
                             updated_at=jobs.db_time() - (10 if process != "current" else 0)
                             ).execute()
    before = list(exposition.CountersCollector().collect())[0].samples
    assert metrics.retire_stale(older_than_s=5) == 2
    after = list(exposition.CountersCollector().collect())[0].samples
    assert [s.value for s in before] == [s.value for s in after] == [15.0]
    assert {row.process_id for row in MetricCounter.select()} == {"current", metrics.RETIRED}
    assert metrics.retire_stale(older_than_s=5) == 0


def events_of(lines):
    by_job = {}
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        if "event" in entry:
            by_job.setdefault(entry["job_id"], []).append(entry)
    return by_job


def test_every_job_event_is_one_json_log_line(conveyor, tmp_path):
    env = {"LOG_FORMAT": "json"}
    submitted = {}
    for type_, payload in (("t.noop", "{}"), ("t.flaky", '{"succeed_on": 2}'),
                           ("t.permanent", "{}")):
        result = conveyor.flask("jobs", "submit", type_, "--payload", payload, env=env)
        submitted[int(result.stdout)] = [json.loads(line) for line in result.stderr.splitlines()]
    waiting = int(conveyor.flask("jobs", "submit", "t.noop", "--delay", "3600", env=env).stdout)
    cancel = conveyor.flask("jobs", "cancel", str(waiting), env=env)
    supervisor = conveyor.start_supervisor(concurrency=2, **env)
    conveyor.wait_until_final(list(submitted))
    supervisor.signal(15)
    supervisor.wait()

    for job_id, lines in submitted.items():
        assert [(e["event"], e["job_id"]) for e in lines] == [("submitted", job_id)]
    cancelled = [json.loads(line) for line in cancel.stderr.splitlines()]
    assert [(e["event"], e["job_id"], e["status"]) for e in cancelled] == [
        ("cancelled", waiting, "cancelled")]

    events = events_of(supervisor.log().splitlines())
    noop, flaky, permanent = submitted
    assert [e["event"] for e in events[noop]] == ["started", "succeeded"]
    assert [e["event"] for e in events[flaky]] == ["started", "retrying", "started", "succeeded"]
    assert [e["event"] for e in events[permanent]] == ["started", "dead"]
    retry = events[flaky][1]
    assert retry["delay_s"] >= 0 and retry["attempt"] == 1 and retry["level"] == "warning"
    for entry in (e for job_events in events.values() for e in job_events):
        assert {"job_id", "type", "queue", "attempt", "worker_id", "ts", "pid"} <= entry.keys()
        assert entry["worker_id"].startswith("w-")


def test_text_logs_carry_the_same_tags(conveyor):
    result = conveyor.flask("jobs", "submit", "t.noop", env={"LOG_FORMAT": "text"})
    [line] = result.stderr.splitlines()
    assert f"job {int(result.stdout)} submitted" in line
    assert "event=submitted" in line and "type=t.noop" in line and "queue=default" in line
    assert os.environ.get("LOG_FORMAT") is None  # the test did not leak its setting
