"""The job routes of SPEC §6, through the real app on both databases: submission and its
checks, idempotency, batches, listing, cancellation, the dead-letter queue, stats,
workers and metrics. Concurrency and cancellation of running jobs use real processes.
"""
import os
import threading

import requests

from core import jobs

from core import workers
from apiserver import admin_key, api, api_with, bearer, gunicorn  # noqa: F401 (fixtures)
from conftest import side_effects, wait_for
from models import Job


def make_dead(conveyor, type="t.permanent", **fields):
    """A dead job, through the same core calls a worker makes."""
    job_id = conveyor.submit(type, **fields)
    worker = workers.WorkerInfo(id=f"test-{job_id}", supervisor_id="test", host="here", pid=1,
                             queues=(conveyor.job(job_id).queue,))
    [job] = jobs.claim(worker)
    assert job.id == job_id
    assert jobs.report(job, jobs.Outcome("failed", error_type="Permanent",
                                         error_message="card declined", permanent=True))
    return job_id


# ---------------------------------------------------------------------------- submit

def test_submitted_job_is_201_with_location_and_reads_back(api):
    key = api.key("me")
    response = api.call("POST", "/v1/jobs", key, json={
        "type": "t.noop", "payload": {"x": 1}, "queue": "q1", "priority": -3,
        "max_attempts": 2, "timeout_s": 9, "backoff": {"base_s": 0.5, "max_s": 4},
        "delay_s": 60})
    assert response.status_code == 201 and response.mimetype == "application/json"
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert {k: job[k] for k in ("type", "payload", "queue", "priority", "max_attempts",
                                "timeout_s", "backoff", "status", "attempt",
                                "idempotency_key")} == {
        "type": "t.noop", "payload": {"x": 1}, "queue": "q1", "priority": -3,
        "max_attempts": 2, "timeout_s": 9.0, "backoff": {"base_s": 0.5, "max_s": 4.0},
        "status": "scheduled", "attempt": 0, "idempotency_key": None}
    shown = api.call("GET", response.headers["Location"], key).get_json()
    assert shown == {**job, "attempts": []}


def test_run_at_with_any_offset_is_stored_in_utc(api):
    key = api.key("me")
    job = api.submit(key, {"type": "t.noop", "run_at": "2031-05-06T09:30:00+02:00"})
    assert job["run_at"] == "2031-05-06T07:30:00.000Z" and job["status"] == "scheduled"


def test_invalid_submissions_are_refused_with_the_reason_and_nothing_is_stored(api):
    key = api.key("me")
    cases = {
        "unknown type": ({"type": "no.such"}, 422, "type: 'no.such' is not registered"),
        "payload against the handler's schema": (
            {"type": "t.schema", "payload": {"to": 5}}, 422, "payload/to: 5 is not of type 'string'"),
        "missing required payload field": (
            {"type": "t.schema", "payload": {}}, 422, "'to' is a required property"),
        "run_at and delay_s": ({"type": "t.noop", "run_at": "2030-01-01T00:00:00Z",
                                "delay_s": 5}, 422, "run_at: not allowed with delay_s"),
        "unknown field": ({"type": "t.noop", "colour": "red"}, 422, "'colour' was unexpected"),
        "not an object": ([{"type": "t.noop"}], 422, "must be an object"),
        "time without offset": ({"type": "t.noop", "run_at": "2030-01-01T00:00:00"}, 422,
                                "needs a UTC offset"),
        "backoff upside down": ({"type": "t.noop", "backoff": {"base_s": 5, "max_s": 1}}, 422,
                                "backoff/max_s"),
    }
    for what, (body, status, message) in cases.items():
        response = api.call("POST", "/v1/jobs", key, json=body)
        assert response.status_code == status, what
        assert response.mimetype == "application/problem+json", what
        problem = response.get_json()
        assert problem["status"] == status and problem["title"] and problem["detail"], what
        assert message in " ".join([problem["detail"], *problem.get("errors", [])]), (what, problem)
    assert Job.select().count() == 0


def test_size_limits_wrong_bodies_and_methods_are_4xx_with_a_problem(api_with):
    api = api_with(MAX_PAYLOAD_BYTES=1000, MAX_REQUEST_BYTES=5000)
    key = api.key("me")
    big_payload = api.call("POST", "/v1/jobs", key, json={"type": "t.noop",
                                                          "payload": {"s": "x" * 1000}})
    assert big_payload.status_code == 413
    assert "over the limit of 1000" in big_payload.get_json()["detail"]
    big_body = api.call("POST", "/v1/jobs", key, data='{"type": "t.noop", "pad": "'
                        + "x" * 6000 + '"}', content_type="application/json")
    assert big_body.status_code == 413
    not_json = api.call("POST", "/v1/jobs", key, data="type=t.noop",
                        content_type="application/json")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.get_json()["detail"]
    form = api.call("POST", "/v1/jobs", key, data="type=t.noop",
                    content_type="application/x-www-form-urlencoded")
    assert form.status_code == 415 and "Content-Type: application/json" in form.get_json()["detail"]
    wrong_method = api.call("PUT", "/v1/jobs", key, json={"type": "t.noop"})
    assert wrong_method.status_code == 405
    assert set(wrong_method.headers["Allow"].split(", ")) >= {"GET", "POST"}
    assert "PUT is not allowed on /v1/jobs" in wrong_method.get_json()["detail"]
    nowhere = api.call("GET", "/v1/nowhere", key)
    assert nowhere.status_code == 404 and nowhere.mimetype == "application/problem+json"
    for response in (big_payload, big_body, not_json, form, wrong_method):
        assert response.mimetype == "application/problem+json"
    assert Job.select().count() == 0


# ---------------------------------------------------------------------------- idempotency

def test_idempotency_key_returns_the_first_job_or_409_and_is_per_api_key(api):
    key, other = api.key("me"), api.key("other")
    body = {"type": "t.noop", "payload": {"order": 42}}
    first = api.call("POST", "/v1/jobs", key, json=body, headers={"Idempotency-Key": "order-42"})
    again = api.call("POST", "/v1/jobs", key, json={"payload": {"order": 42}, "type": "t.noop"},
                     headers={"Idempotency-Key": "order-42"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert first.get_json()["idempotency_key"] == "order-42"

    changed = api.call("POST", "/v1/jobs", key, json={**body, "priority": 1},
                       headers={"Idempotency-Key": "order-42"})
    assert changed.status_code == 409
    assert "used for a different request" in " ".join(changed.get_json()["errors"])

    theirs = api.call("POST", "/v1/jobs", other, json=body, headers={"Idempotency-Key": "order-42"})
    assert theirs.status_code == 201 and theirs.get_json()["id"] != first.get_json()["id"]
    assert Job.select().count() == 2


def test_a_single_submissions_conflict_names_no_batch_index(api):
    key = api.key("me")
    first = api.submit(key, {"type": "t.noop", "payload": {"order": 42}},
                       headers={"Idempotency-Key": "order-42"})
    single = api.call("POST", "/v1/jobs", key, json={"type": "t.noop", "payload": {"order": 43}},
                      headers={"Idempotency-Key": "order-42"})
    assert single.status_code == 409
    assert single.get_json()["errors"] == [
        f"idempotency key 'order-42' was used for a different request (job {first['id']})"]
    batch = api.call("POST", "/v1/jobs/batch", key, json={"jobs": [
        {"type": "t.noop"}, {"type": "t.noop", "idempotency_key": "order-42"}]})
    assert batch.status_code == 409 and batch.get_json()["errors"][0].startswith("1: ")


def test_bad_idempotency_keys_are_422(api):
    key = api.key("me")
    for header in ("", "x" * 256, "caf\u00e9"):
        response = api.call("POST", "/v1/jobs", key, json={"type": "t.noop"},
                            headers={"Idempotency-Key": header.encode().decode("latin-1")})
        assert response.status_code == 422, header
    differ = api.call("POST", "/v1/jobs", key, json={"type": "t.noop", "idempotency_key": "a"},
                      headers={"Idempotency-Key": "b"})
    assert differ.status_code == 422
    assert Job.select().count() == 0


def test_twenty_concurrent_identical_requests_make_exactly_one_job(conveyor, gunicorn):
    server = gunicorn(workers=2)
    key = admin_key(conveyor)
    start = threading.Barrier(20)
    results = []

    def submit():
        start.wait()
        response = requests.post(f"{server.url}/v1/jobs", headers={
            **bearer(key), "Idempotency-Key": "only-once"}, json={"type": "t.noop"}, timeout=30)
        results.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(status for status, _ in results) == [200] * 19 + [201]
    assert len({job_id for _, job_id in results}) == 1
    assert Job.select().count() == 1


# ---------------------------------------------------------------------------- batch

def test_batch_stores_all_in_order_in_one_go(api):
    key = api.key("me")
    items = [{"type": "t.noop", "payload": {"i": i}} for i in range(3)]
    items.append({"type": "t.noop", "payload": {"i": 3}, "idempotency_key": "b-3"})
    response = api.call("POST", "/v1/jobs/batch", key, json={"jobs": items})
    assert response.status_code == 201
    stored = response.get_json()["items"]
    assert [job["payload"]["i"] for job in stored] == [0, 1, 2, 3]
    assert [job["id"] for job in stored] == sorted(job["id"] for job in stored)
    assert stored[3]["idempotency_key"] == "b-3"
    replay = api.call("POST", "/v1/jobs/batch", key, json={"jobs": items[3:]})
    assert replay.status_code == 200 and replay.get_json()["items"] == stored[3:]


def test_a_batch_answers_and_stores_every_json_value_as_sent(api):
    """orjson reads and writes the batch when it can; what it cannot hold as sent (an
    integer beyond 64 bits becomes a float when read; a lone surrogate or such an integer
    is not written) goes through the standard library, so nothing changes on the way."""
    key = api.key("me")
    for payload in [{"big": 123456789012345678901234567890, "small": -9223372036854775809},
                    {"surrogate": "\ud800", "text": "é€😀"},
                    {"u64": 18446744073709551615, "float": 1e-05, "zero": -0.0,
                     "max": 1.7976931348623157e308, "text": "é€😀"}]:
        response = api.call("POST", "/v1/jobs/batch", key,
                            json={"jobs": [{"type": "t.noop", "payload": payload}]})
        assert response.status_code == 201
        [job] = response.get_json()["items"]
        shown = api.call("GET", f"/v1/jobs/{job['id']}", key).get_json()
        for answered in (job["payload"], shown["payload"]):
            assert answered == payload
            assert {name: type(value) for name, value in answered.items()} == \
                {name: type(value) for name, value in payload.items()}


def test_a_long_integer_across_the_steps_a_body_is_read_in_stays_exact(api):
    """The body is searched for long runs of digits READ_STEP bytes at a time: a run that
    starts in one step and ends in the next is found too."""
    import app
    key = api.key("me")
    big = 123456789012345678901234567890
    head = '{"jobs": [{"type": "t.noop", "payload": {"big": '
    for start in (app.READ_STEP - 10, app.READ_STEP - 18, app.READ_STEP + 1):
        padding = start - len(head) - len('"pad": "", ')
        body = head.replace('{"big": ', '{"pad": "' + "x" * padding + '", "big": ') + f"{big}}}}}]}}"
        assert body.index(str(big)) == start
        response = api.call("POST", "/v1/jobs/batch", key, data=body,
                            content_type="application/json")
        assert response.status_code == 201
        assert response.get_json()["items"][0]["payload"]["big"] == big


def test_batch_with_bad_items_names_each_index_and_stores_none(api):
    key = api.key("me")
    items = [{"type": "t.noop"}, {"type": "nope"}, {"type": "t.noop"},
             {"type": "t.schema", "payload": {}}, {"type": "t.noop", "priority": "high"}]
    response = api.call("POST", "/v1/jobs/batch", key, json={"jobs": items})
    assert response.status_code == 422
    errors = response.get_json()["errors"]
    assert sorted({error.split(":")[0] for error in errors}) == ["1", "3", "4"]
    assert Job.select().count() == 0


def test_batch_limits_1000_jobs_and_refuses_oversized_payloads(api_with):
    api = api_with(MAX_PAYLOAD_BYTES=100)
    key = api.key("me")
    thousand = [{"type": "t.noop", "payload": {"i": i}} for i in range(1000)]
    stored = api.call("POST", "/v1/jobs/batch", key, json={"jobs": thousand})
    assert stored.status_code == 201 and len(stored.get_json()["items"]) == 1000
    too_many = api.call("POST", "/v1/jobs/batch", key, json={"jobs": thousand + thousand[:1]})
    assert too_many.status_code == 422
    for body in ({"jobs": []}, {"jobs": "all"}, {"jobs": thousand[:1], "more": 1}, []):
        assert api.call("POST", "/v1/jobs/batch", key, json=body).status_code == 422, body
    oversized = api.call("POST", "/v1/jobs/batch", key, json={"jobs": [
        {"type": "t.noop"}, {"type": "t.noop", "payload": {"s": "x" * 200}}]})
    assert oversized.status_code == 413 and "job 1:" in oversized.get_json()["detail"]
    assert Job.select().count() == 1000


# ---------------------------------------------------------------------------- list

def test_lists_page_newest_first_with_an_opaque_cursor_and_filters(api):
    key = api.key("me", "admin")
    ids = [api.submit(key, {"type": "t.noop" if i % 2 else "t.sleep", "queue": f"q{i % 3}"})["id"]
           for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        page = api.call("GET", "/v1/jobs", key, query_string={
            "limit": 3, **({"cursor": cursor} if cursor else {})}).get_json()
        seen += [job["id"] for job in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3
    only = api.call("GET", "/v1/jobs?type=t.noop&queue=q1&status=available", key).get_json()
    assert [job["id"] for job in only["items"]] == [ids[1]] and only["next_cursor"] is None
    assert api.call("GET", "/v1/jobs?status=running", key).get_json()["items"] == []

    for query in ("limit=501", "limit=0", "limit=ten", "status=finished", "type=a%20b",
                  "cursor=bogus", "stauts=dead"):
        response = api.call("GET", f"/v1/jobs?{query}", key)
        assert response.status_code == 422, query
        assert response.get_json()["errors"], query


def test_refusals_are_titled_for_what_was_invalid(api):
    key = api.key("ops", "admin")
    cases = [  # (method, path, body, Idempotency-Key, title)
        ("GET", "/v1/jobs?limit=1000", None, None, "Invalid request"),
        ("GET", "/v1/jobs?status=finished", None, None, "Invalid request"),
        ("GET", "/v1/jobs?cursor=bogus", None, None, "Invalid request"),
        ("GET", "/v1/jobs?colour=red", None, None, "Invalid request"),
        ("GET", "/v1/dlq?queue=a%20b", None, None, "Invalid request"),
        ("GET", "/v1/schedules?limit=1000", None, None, "Invalid request"),
        ("POST", "/v1/jobs", {"type": "t.noop"}, "caf\u00e9", "Invalid request"),
        ("POST", "/v1/jobs", {"type": "t.noop", "idempotency_key": "a"}, "b", "Invalid request"),
        ("POST", "/v1/jobs", {"type": "no.such"}, None, "Invalid job"),
        ("POST", "/v1/jobs/batch", {"jobs": [{"type": "no.such"}]}, None, "Invalid job"),
        ("POST", "/v1/schedules", {"name": "feb", "cron": "0 0 30 2 *", "type": "t.noop"}, None,
         "Invalid schedule"),
        ("POST", "/v1/schedules", {"name": "feb", "cron": "* * * * *", "type": "no.such"}, None,
         "Invalid schedule"),
    ]
    for method, path, body, idempotency_key, title in cases:
        headers = {"Idempotency-Key": idempotency_key.encode().decode("latin-1")} \
            if idempotency_key else {}
        response = api.call(method, path, key, json=body, headers=headers)
        assert (response.status_code, response.get_json()["title"]) == (422, title), path


# ---------------------------------------------------------------------------- cancel

def test_cancelling_a_waiting_job_is_immediate_and_final_jobs_are_409(api):
    key = api.key("me")
    job_id = api.submit(key, {"type": "t.noop", "delay_s": 600})["id"]
    cancelled = api.call("POST", f"/v1/jobs/{job_id}/cancel", key)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert cancelled.get_json()["finished_at"] is not None
    again = api.call("POST", f"/v1/jobs/{job_id}/cancel", key)
    assert again.status_code == 409 and "is cancelled" in again.get_json()["detail"]
    assert api.call("POST", "/v1/jobs/999999/cancel", key).status_code == 404


def test_cancelling_a_running_job_stops_its_worker_within_seconds(conveyor, gunicorn, tmp_path):
    server = gunicorn()
    key = admin_key(conveyor)
    conveyor.start_supervisor(concurrency=1)
    log = str(tmp_path / "effects.log")
    job = requests.post(f"{server.url}/v1/jobs", headers=bearer(key), json={
        "type": "t.wait_file", "payload": {"file": str(tmp_path / "never"), "log": log,
                                           "max_s": 60}}, timeout=10).json()
    conveyor.wait_for_status(job["id"], "running")
    wait_for(lambda: side_effects(log), message="the handler to start")

    response = requests.post(f"{server.url}/v1/jobs/{job['id']}/cancel", headers=bearer(key),
                             timeout=10)
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested_at"]
    conveyor.wait_for_status(job["id"], "cancelled", timeout=5)

    shown = requests.get(f"{server.url}/v1/jobs/{job['id']}", headers=bearer(key), timeout=10).json()
    assert shown["status"] == "cancelled"
    assert [(a["number"], a["status"]) for a in shown["attempts"]] == [(1, "cancelled")]
    [(event, _, _, pid, _)] = side_effects(log)
    assert event == "start" and not os.path.exists(f"/proc/{pid}")  # the worker was stopped


# ---------------------------------------------------------------------------- DLQ

def test_dead_letter_queue_lists_retries_and_discards(api):
    admin = api.key("admin", "admin")
    dead = make_dead(api.conveyor)
    also_dead = make_dead(api.conveyor)
    api.conveyor.submit("t.noop")
    listed = api.call("GET", "/v1/dlq", admin).get_json()
    assert [job["id"] for job in listed["items"]] == [also_dead, dead]
    assert listed["items"][0]["dead_reason"] == "permanent"
    assert listed["items"][0]["last_error"] == "Permanent: card declined"
    assert api.call("GET", "/v1/dlq?type=t.noop", admin).get_json()["items"] == []

    retried = api.call("POST", f"/v1/dlq/{dead}/retry", admin)
    assert retried.status_code == 200 and retried.get_json()["status"] == "available"
    assert api.call("POST", f"/v1/dlq/{dead}/retry", admin).status_code == 409
    discarded = api.call("DELETE", f"/v1/dlq/{also_dead}", admin)
    assert discarded.status_code == 200 and discarded.get_json()["status"] == "cancelled"
    assert api.call("DELETE", f"/v1/dlq/{also_dead}", admin).status_code == 409
    assert api.call("DELETE", "/v1/dlq/424242", admin).status_code == 404
    history = api.call("GET", f"/v1/jobs/{also_dead}", admin).get_json()["attempts"]
    assert [a["status"] for a in history] == ["failed"]
    assert api.call("GET", "/v1/dlq", admin).get_json() == {"items": [], "next_cursor": None}


# ---------------------------------------------------------------------------- ops

def test_stats_workers_and_metrics_come_from_the_database(api):
    admin = api.key("admin", "admin")
    api.conveyor.submit_many("t.noop", [{}, {}], queue="mail")
    make_dead(api.conveyor)
    stats = api.call("GET", "/v1/stats", admin).get_json()
    assert stats["queues"] == {"mail": {"available": 2}, "default": {"dead": 1}}
    assert stats["totals"] == {"available": 2, "dead": 1} and stats["workers_alive"] == 0
    assert api.call("GET", "/v1/workers", admin).get_json() == {"items": [], "next_cursor": None}

    text = api.call("GET", "/metrics", admin).get_data(as_text=True)
    assert 'conveyor_jobs{queue="mail",status="available"} 2.0' in text
    assert 'conveyor_jobs{queue="default",status="dead"} 1.0' in text
    assert 'conveyor_jobs{queue="mail",status="running"} 0.0' in text
    assert "conveyor_workers_alive 0.0" in text
    assert api.call("GET", "/metrics").status_code == 401
    assert api.call("GET", "/healthz").get_json() == {
        "status": "ok", "rate_limit_storage": {"ok": True, "on_error": "closed"}}


def test_metrics_are_public_with_metrics_public(api_with):
    api = api_with(METRICS_PUBLIC="1")
    response = api.call("GET", "/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert "# TYPE conveyor_jobs gauge" in response.get_data(as_text=True)


def test_workers_lists_a_live_supervisors_processes(conveyor, api):
    admin = api.key("admin", "admin")
    supervisor = conveyor.start_supervisor(concurrency=2)
    supervisor.wait_for_workers(2)
    workers = wait_for(lambda: len(api.call("GET", "/v1/workers", admin).get_json()["items"]) == 2
                       and api.call("GET", "/v1/workers", admin).get_json()["items"])
    assert sorted(w["pid"] for w in workers) == sorted(supervisor.worker_pids())
    assert all(w["current_job_id"] is None and w["queues"] == [] for w in workers)
    assert api.call("GET", "/v1/stats", admin).get_json()["workers_alive"] == 2
