"""SPEC §12, on both databases with real supervisors: follow-up jobs exist if and only if
their parent's success is recorded (never from an attempt that failed, crashed or was
fenced, once however often the parent ran); unique jobs are decided by the database;
a job whose expiry passes before it starts never starts."""
import os
import signal
import threading

import pytest

from apiserver import api  # noqa: F401 (fixture)
from checks import (LONG_LEASE, SHORT_LEASE, assert_audit_clean, attempt_status, effect_seen,
                    gate_path, release, running_attempt, stopped)
from conftest import rules, side_effects, wait_for
from core import jobs, submission
from models import Job, QueueSetting, now


def children_of(parent_id):
    return list(Job.select().where(Job.parent_id == parent_id).order_by(Job.id))


def followups(n, **options):
    return [{"type": "t.noop", "payload": {"i": i}, "options": options} for i in range(n)]


# ---------------------------------------------------------------------------- follow-ups

def test_a_parent_retried_three_times_makes_each_followup_once(conveyor, api):
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    key = api.key("reports")
    parent = api.submit(key, {"type": "t.gate", "max_attempts": 5, "backoff": {"base_s": 0},
                              "payload": {"hold": [], "succeed_on": 4,
                                          "followups": followups(3, queue="emails")}})
    conveyor.wait_for_status(parent["id"], "succeeded")
    assert [a.status for a in conveyor.attempts(parent["id"])] == ["failed"] * 3 + ["succeeded"]

    made = children_of(parent["id"])
    assert sorted(child.payload["i"] for child in made) == [0, 1, 2]
    assert {(child.type, child.queue) for child in made} == {("t.noop", "emails")}
    listed = api.call("GET", f"/v1/jobs?parent_id={parent['id']}", key).get_json()["items"]
    assert sorted(item["id"] for item in listed) == [child.id for child in made]
    assert {item["parent_id"] for item in listed} == {parent["id"]}
    other = api.key("someone-else")
    assert api.call("GET", f"/v1/jobs?parent_id={parent['id']}", other).get_json()["items"] == []
    assert_audit_clean(conveyor)


def test_followups_wait_for_the_parents_success_and_then_run(conveyor, tmp_path, effects_log):
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    gate = gate_path(tmp_path)
    parent = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log,
                                        "followups": 2, "followup_type": "t.sleep"})
    effect_seen(effects_log, "start", parent, 1)  # ctx.enqueue has been called by now
    assert children_of(parent) == []  # nothing exists before the success is recorded
    release(gate, 1)
    conveyor.wait_for_status(parent, "succeeded")
    made = children_of(parent)
    assert len(made) == 2
    conveyor.wait_until_final([child.id for child in made])
    assert {conveyor.job(child.id).status for child in made} == {"succeeded"}


def test_a_worker_killed_after_enqueue_makes_no_followups(conveyor):
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    # t.crash asks for its follow-ups, then kills its own worker (kill -9) on attempt 1.
    parent = conveyor.submit("t.crash", {"succeed_on": 2, "followups": 2},
                             backoff={"base_s": 0})
    conveyor.wait_for_status(parent, "succeeded")
    assert [a.status for a in conveyor.attempts(parent)] == ["crashed", "succeeded"]
    assert sorted(child.payload["i"] for child in children_of(parent)) == [0, 1]
    assert_audit_clean(conveyor)


def test_a_fenced_success_makes_no_followups(conveyor, effects_log, tmp_path):
    conveyor.start_supervisor(concurrency=2, HEARTBEAT_S=0.5, **SHORT_LEASE)
    gate = gate_path(tmp_path)
    parent = conveyor.submit("t.gate", {"gate": gate, "hold": [1, 2], "log": effects_log,
                                        "followups": 3}, timeout_s=600)
    stalled = running_attempt(conveyor, parent, 1)
    effect_seen(effects_log, "start", parent, 1)
    last = conveyor.job(parent).heartbeat_at
    wait_for(lambda: conveyor.job(parent).heartbeat_at != last, interval=0.005,
             message="a heartbeat")
    os.kill(stalled.pid, signal.SIGSTOP)  # past its lease: attempt 1 is crashed, 2 begins
    try:
        wait_for(lambda: stopped(stalled.pid), message="the worker to stop")
        attempt_status(conveyor, parent, 1, "crashed")
        running_attempt(conveyor, parent, 2)
        effect_seen(effects_log, "start", parent, 2)
    finally:
        release(gate, 1)
        os.kill(stalled.pid, signal.SIGCONT)
    # Attempt 1's handler returns: its success is refused, and so are its follow-ups.
    wait_for(lambda: conveyor.attempts(parent)[0].fenced, message="the late success refused")
    assert children_of(parent) == []
    release(gate, 2)
    conveyor.wait_for_status(parent, "succeeded")
    assert sorted(child.payload["i"] for child in children_of(parent)) == [0, 1, 2]
    assert_audit_clean(conveyor)


def test_a_followup_that_is_not_a_valid_job_fails_the_attempt(conveyor):
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    parent = conveyor.submit("t.gate", {"hold": [], "followups": [
        {"type": "t.noop", "options": {"priority": "high"}}]}, max_attempts=1)
    job = conveyor.wait_for_status(parent, "dead")
    assert "priority" in job.last_error and job.last_error.startswith("ValueError")
    assert children_of(parent) == []


# ---------------------------------------------------------------------------- unique jobs

def test_fifty_concurrent_identical_submissions_make_one_job(conveyor):
    body = {"type": "t.noop", "payload": {"user": 7}, "unique_key": "user-7"}
    results, start = [], threading.Barrier(50)

    def submit():
        start.wait()
        results.append(jobs.enqueue([submission.validate_submission(body, rules())])[0])
    threads = [threading.Thread(target=submit) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 50
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert Job.select().where(Job.type == "t.noop", Job.unique_key == "user-7").count() == 1


def test_a_unique_key_is_held_while_queued_or_active_and_freed_when_the_job_ends(
        conveyor, api, tmp_path, effects_log):
    key = api.key("cache")
    gate = gate_path(tmp_path)
    queued = {"type": "t.gate", "unique_key": "user-7",
              "payload": {"gate": gate, "hold": [1], "log": effects_log}}
    first = api.call("POST", "/v1/jobs", key, json=queued)
    again = api.call("POST", "/v1/jobs", key, json={**queued, "payload": {"other": 1}})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["unique_key"] == "user-7"

    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    effect_seen(effects_log, "start", first.get_json()["id"], 1)
    # Running: a "queued" key is free again, an "active" one is not.
    second = api.call("POST", "/v1/jobs", key, json={**queued, "unique_while": "active"})
    assert second.status_code == 201
    effect_seen(effects_log, "start", second.get_json()["id"], 1)
    third = api.call("POST", "/v1/jobs", key, json={**queued, "payload": {}})
    assert third.status_code == 200 and third.get_json()["id"] == second.get_json()["id"]

    release(gate, 1)
    conveyor.wait_until_final([first.get_json()["id"], second.get_json()["id"]])
    fourth = api.call("POST", "/v1/jobs", key, json={**queued, "payload": {}})
    assert fourth.status_code == 201  # the job that held the key ended: it is free


def test_a_batch_with_one_unique_key_twice_makes_one_job(conveyor, api):
    key = api.key("batch")
    items = [{"type": "t.noop", "unique_key": "k"}, {"type": "t.noop"},
             {"type": "t.noop", "unique_key": "k"}]
    response = api.call("POST", "/v1/jobs/batch", key, json={"jobs": items})
    assert response.status_code == 201
    ids = [item["id"] for item in response.get_json()["items"]]
    assert ids[0] == ids[2] and len(set(ids)) == 2


# ---------------------------------------------------------------------------- expiry

def test_a_job_that_expires_in_a_paused_queue_never_starts(conveyor, api, effects_log):
    QueueSetting.insert(name="paused", paused=True, updated_at=now()).execute()
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    key = api.key("notifier")
    job = api.submit(key, {"type": "t.noop", "queue": "paused", "ttl_s": 0.5,
                           "payload": {"log": effects_log}})
    assert job["expires_at"] is not None
    ended = conveyor.wait_for_status(job["id"], "cancelled")
    assert (ended.cancel_reason, ended.attempt) == ("expired", 0)
    QueueSetting.update(paused=False).where(QueueSetting.name == "paused").execute()
    shown = api.call("GET", f"/v1/jobs/{job['id']}", key).get_json()
    assert shown["status"] == "cancelled" and shown["cancel_reason"] == "expired"
    assert shown["attempts"] == [] and side_effects(effects_log) == []


def test_a_job_held_back_by_a_limit_past_its_expiry_never_starts(conveyor, tmp_path,
                                                                 effects_log):
    QueueSetting.insert(name="narrow", concurrency=1, updated_at=now()).execute()
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    gate = gate_path(tmp_path)
    busy = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log},
                           queue="narrow")
    effect_seen(effects_log, "start", busy, 1)
    waiting = conveyor.submit("t.noop", {"log": effects_log}, queue="narrow", ttl_s=0.5)
    ended = conveyor.wait_for_status(waiting, "cancelled")
    release(gate, 1)
    conveyor.wait_for_status(busy, "succeeded")
    assert (ended.cancel_reason, ended.attempt) == ("expired", 0)
    assert [line[1] for line in side_effects(effects_log)] == [str(busy), str(busy)]


def test_a_job_started_before_its_expiry_runs_to_the_end(conveyor):
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE).wait_for_workers(1)
    job = conveyor.submit("t.sleep", {"s": 1.0}, ttl_s=0.5)  # a worker waits for it
    assert conveyor.wait_for_status(job, "succeeded").cancel_reason is None


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fields, named", [
    ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": -5}, "ttl_s"),
    ({"ttl_s": 60, "expires_at": "2030-01-01T00:00:00Z"}, "ttl_s"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"unique_key": "k", "unique_while": "forever"}, "unique_while"),
    ({"unique_while": "active"}, "unique_while"),
    ({"unique_key": ""}, "unique_key"),
])
def test_bad_talkback_fields_are_422_naming_the_field(conveyor, api, fields, named):
    key = api.key("bad")
    single, batch = api.refused(key, fields)
    assert any(error.startswith(named) for error in single)
    assert any(error.startswith(f"1: {named}") or error.startswith(f"1/{named}")
               or error.startswith(f"jobs/1/{named}") for error in batch), batch


def test_parent_id_filter_must_be_an_id(conveyor, api):
    key = api.key("reader")
    assert api.call("GET", "/v1/jobs?parent_id=abc", key).status_code == 422
    assert api.call("GET", "/v1/jobs?parent_id=0", key).status_code == 422


def test_flask_jobs_submit_takes_a_unique_key_and_a_ttl(conveyor):
    first = conveyor.flask("jobs", "submit", "t.noop", "--unique-key", "nightly", "--ttl", "1h")
    again = conveyor.flask("jobs", "submit", "t.noop", "--unique-key", "nightly")
    assert first.stdout.strip() == again.stdout.strip()
    job = conveyor.job(int(first.stdout))
    assert job.unique_key == "nightly" and 3590 < job.expires_at - job.created_at <= 3600
    refused = conveyor.flask("jobs", "submit", "t.noop", "--ttl", "0", check=False)
    assert refused.returncode != 0 and "ttl_s" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
