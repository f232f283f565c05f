"""Bulk operations (SPEC §12): POST /v1/dlq/retry and POST /v1/jobs/cancel act on every job
matching {type?, queue?, group?, created_before?} and answer {"count": n}; each does to
every matching job what its single-job route does to one (a dead job back in the queue with
a fresh attempt budget and its history kept; a waiting job cancelled, a running one stopped
within 5 s with its attempt recorded cancelled). `flask dlq retry --all`, `flask jobs cancel
--all` and the Python client do the same; every bad filter is a 422 naming it."""
import json
import time
import uuid

import pytest

from apiserver import api, gunicorn  # noqa: F401 (fixtures)
from checks import LONG_LEASE, assert_audit_clean, cli, gate_path, running_attempt
from client import Conveyor, Invalid
from core import jobs, keys, workers
from core import status as S
from core.policy import Outcome
from core.times import timestamp
from models import Attempt, Job

PERMANENT = Outcome(S.FAILED, error_type="Permanent", error_message="receiver down",
                    permanent=True)
STOPPED_WITHIN_S = 5.0  # SPEC §6: a running job's worker is stopped within 5 s of a cancel


def dead_letter(count):
    """Claim every available job as a worker does and record its attempt failed for good:
    the jobs end dead with one attempt each, through the same core calls a worker makes.
    Returns how many."""
    worker = workers.WorkerInfo(id=f"w-{uuid.uuid4().hex[:8]}", supervisor_id="s",
                                host="here", pid=1)
    reports, ended = [], 0
    while True:
        claimed, accepted = jobs.step(worker, reports, 100)
        assert all(accepted)
        ended += len(reports)
        if not claimed:
            return ended
        reports = [jobs.Report(job, PERMANENT) for job in claimed]


def statuses(ids):
    return {row.id: row.status for row in Job.select(Job.id, Job.status).where(Job.id.in_(ids))}


def bulk(api, key, path, body=None, **kwargs):
    response = api.call("POST", path, key, json=body, **kwargs)
    return response.status_code, response.get_json()


# ---------------------------------------------------------------------------- DLQ retry

def test_500_dead_jobs_go_back_in_one_call_with_fresh_budgets_and_their_history(api):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    dead = conveyor.submit_many("t.flaky", [{"succeed_on": 2, "n": n} for n in range(500)],
                                queue="webhooks", max_attempts=1)
    untouched = conveyor.submit_many("t.noop", [{}] * 5, queue="webhooks", delay_s=3600)
    assert dead_letter(500) == 500
    assert set(statuses(dead).values()) == {S.DEAD}

    assert bulk(api, admin, "/v1/dlq/retry", {"queue": "webhooks"}) == (200, {"count": 500})

    for job in Job.select().where(Job.id.in_(dead)):
        assert (job.status, job.attempt, job.attempt_base, job.dead_reason, job.finished_at) \
            == (S.AVAILABLE, 1, 1, None, None), job.id
    assert set(statuses(untouched).values()) == {S.SCHEDULED}
    assert bulk(api, admin, "/v1/dlq/retry", {"queue": "webhooks"}) == (200, {"count": 0})

    # A fresh budget: max_attempts is 1, and attempt 2 runs (and succeeds, as t.flaky does).
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    conveyor.wait_until_final(dead, timeout=60)
    assert set(statuses(dead).values()) == {S.SUCCEEDED}
    history = {}
    for attempt in Attempt.select().where(Attempt.job_id.in_(dead)):
        history.setdefault(attempt.job_id, []).append((attempt.number, attempt.status))
    assert all(sorted(runs) == [(1, "failed"), (2, "succeeded")] for runs in history.values())
    assert len(history) == 500
    assert_audit_clean(conveyor)


def test_dlq_retry_acts_on_exactly_the_matching_dead_jobs(api):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    made = {}  # id -> (type, queue, group, old)
    for type_ in ("t.noop", "t.sleep"):
        for queue in ("a", "b"):
            for group in (None, "customer-7"):
                fields = {"queue": queue, **({"group": group} if group else {})}
                for old in (False, True):
                    made[conveyor.submit(type_, **fields)] = (type_, queue, group, old)
    dead_letter(len(made))
    day_ago = jobs.db_time() - 86400
    Job.update(created_at=day_ago - 60).where(
        Job.id.in_([job_id for job_id, (*_, old) in made.items() if old])).execute()
    living = conveyor.submit("t.noop", queue="a")  # not dead: never retried

    cases = [
        ({"type": "t.sleep"}, lambda t, q, g, old: t == "t.sleep"),
        ({"queue": "b", "group": "customer-7"}, lambda t, q, g, old: q == "b" and g == "customer-7"),
        ({"created_before": timestamp(day_ago)}, lambda t, q, g, old: old),
        ({"type": "t.noop", "queue": "a", "created_before": timestamp(day_ago)},
         lambda t, q, g, old: t == "t.noop" and q == "a" and old),
        ({"group": "nobody"}, lambda *_: False),
        ({}, lambda *_: True),
    ]
    for body, matches in cases:
        Job.update(status=S.DEAD).where(Job.id.in_(list(made))).execute()
        expected = {job_id for job_id, row in made.items() if matches(*row)}
        status, answer = bulk(api, admin, "/v1/dlq/retry", body)
        assert (status, answer) == (200, {"count": len(expected)}), body
        assert {job_id for job_id, s in statuses(list(made)).items() if s == S.AVAILABLE} \
            == expected, body
    assert conveyor.job(living).status == S.AVAILABLE and conveyor.job(living).attempt == 0


# ---------------------------------------------------------------------------- cancel

def test_cancel_all_by_queue_cancels_the_waiting_and_stops_the_running(api, tmp_path):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    gate = gate_path(tmp_path)
    running = conveyor.submit("t.gate", {"gate": gate}, queue="emails")
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    running_attempt(conveyor, running, 1)
    waiting = (conveyor.submit_many("t.noop", [{}] * 3, queue="emails")
               + conveyor.submit_many("t.noop", [{}] * 3, queue="emails", delay_s=3600))
    elsewhere = conveyor.submit_many("t.noop", [{}] * 3, queue="reports", delay_s=3600)

    asked = time.monotonic()
    assert bulk(api, admin, "/v1/jobs/cancel", {"queue": "emails"}) == (200, {"count": 7})

    assert set(statuses(waiting).values()) == {S.CANCELLED}
    assert all(conveyor.attempts(job_id) == [] for job_id in waiting)
    assert set(statuses(elsewhere).values()) == {S.SCHEDULED}
    stopped = conveyor.wait_for_status(running, S.CANCELLED, timeout=STOPPED_WITHIN_S)
    assert time.monotonic() - asked <= STOPPED_WITHIN_S
    assert [(a.number, a.status) for a in conveyor.attempts(running)] == [(1, "cancelled")]
    assert stopped.finished_at is not None
    assert bulk(api, admin, "/v1/jobs/cancel", {"queue": "emails"}) == (200, {"count": 0})
    assert_audit_clean(conveyor)


def test_cancel_all_acts_on_exactly_the_matching_unended_jobs(api):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    made = {}  # id -> (type, queue, group)
    for type_ in ("t.noop", "t.sleep"):
        for queue in ("a", "b"):
            for group in (None, "g"):
                fields = {"queue": queue, **({"group": group} if group else {})}
                made[conveyor.submit(type_, delay_s=3600, **fields)] = (type_, queue, group)
    conveyor.submit("t.noop", queue="a")
    ended = dead_letter(1)
    assert ended == 1

    status, answer = bulk(api, admin, "/v1/jobs/cancel", {"type": "t.sleep", "group": "g"})
    expected = {job_id for job_id, (t, q, g) in made.items() if t == "t.sleep" and g == "g"}
    assert (status, answer) == (200, {"count": len(expected)})
    assert {j for j, s in statuses(list(made)).items() if s == S.CANCELLED} == expected

    before = jobs.db_time()
    late = conveyor.submit("t.noop", delay_s=3600)
    assert bulk(api, admin, "/v1/jobs/cancel", {"created_before": timestamp(before)}) == (
        200, {"count": len(made) - len(expected)})
    assert conveyor.job(late).status == S.SCHEDULED
    assert Job.select().where(Job.status == S.DEAD).count() == 1, "dead jobs are not cancelled"
    assert api.call("POST", "/v1/jobs/cancel", admin).get_json() == {"count": 1}, \
        "no body at all: every job not ended"
    assert conveyor.job(late).status == S.CANCELLED


# ---------------------------------------------------------------------------- refusals

BAD_FILTERS = [
    ({"kind": "x"}, "kind: not a filter"), ({"queue": "a", "status": "dead"}, "status: not a filter"),
    ({"type": 5}, "type: "), ({"type": ""}, "type: "), ({"queue": "two words"}, "queue: "),
    ({"queue": None}, "queue: "), ({"group": ""}, "group: "), ({"group": "x" * 201}, "group: "),
    ({"group": ["a"]}, "group: "), ({"created_before": "2030-01-01"}, "created_before: "),
    ({"created_before": "2030-01-01T00:00:00"}, "created_before: no UTC offset"),
    ({"created_before": "2030-13-01T00:00:00Z"}, "created_before: "),
    ({"created_before": 1700000000}, "created_before: "), ([], "(filters): "),
    ("queue", "(filters): "),
]


@pytest.mark.parametrize("path", ["/v1/dlq/retry", "/v1/jobs/cancel"])
def test_every_bad_filter_is_a_422_naming_it_and_acts_on_nothing(api, path):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    waiting = conveyor.submit("t.noop", queue="a", delay_s=3600)
    dead = conveyor.submit("t.noop", queue="a")
    Job.update(status=S.DEAD).where(Job.id == dead).execute()
    for body, named in BAD_FILTERS:
        response = api.call("POST", path, admin, json=body)
        assert response.status_code == 422, (body, response.get_json())
        assert response.mimetype == "application/problem+json"
        problem = response.get_json()
        assert problem["title"] == "Invalid request"
        assert any(error.startswith(named) for error in problem["errors"]), (body, problem)
    refused = api.call("POST", path, admin, query_string="queue=a", json={})
    assert refused.status_code == 422 and refused.get_json()["errors"][0].startswith("queue: ")
    null = api.call("POST", path, admin, data="null", content_type="application/json")
    assert null.status_code == 422 and null.get_json()["errors"][0].startswith("(filters): ")
    assert api.call("POST", path, admin, data="{queue", content_type="application/json"
                    ).status_code == 400
    assert api.call("POST", path, api.key("app"), json={}).status_code == 403
    assert api.call("POST", path, json={}).status_code == 401
    assert statuses([waiting, dead]) == {waiting: S.SCHEDULED, dead: S.DEAD}


# ---------------------------------------------------------------------------- CLI, client

def test_flask_dlq_retry_all_and_jobs_cancel_all_print_the_count(conveyor):
    kept = conveyor.submit_many("t.noop", [{}] * 2, queue="a", group="g")
    other = conveyor.submit("t.noop", queue="b")
    dead_letter(3)

    assert cli("dlq", "retry", "--all", "--queue", "a", "--group", "g").stdout == \
        "2 dead jobs are available again\n"
    assert set(statuses(kept).values()) == {S.AVAILABLE}
    assert cli("dlq", "retry", str(other)).stdout == f"job {other} is available again\n"
    assert json.loads(cli("dlq", "retry", "--all", "--json").stdout) == {"count": 0}
    assert json.loads(cli("jobs", "cancel", "--all", "--type", "t.noop", "--created-before",
                          "2000-01-01T00:00:00Z", "--json").stdout) == {"count": 0}
    assert cli("jobs", "cancel", "--all", "--queue", "a").stdout == \
        "2 jobs cancelled (running ones are stopped by their supervisors)\n"
    assert statuses(kept + [other]) == {kept[0]: S.CANCELLED, kept[1]: S.CANCELLED,
                                        other: S.AVAILABLE}
    assert json.loads(cli("jobs", "cancel", str(other), "--json").stdout)["status"] == S.CANCELLED


CLI_REFUSALS = [
    (("dlq", "retry"), "give a job id, or --all"),
    (("dlq", "retry", "7", "--all"), "give a job id, or --all"),
    (("jobs", "cancel", "7", "--queue", "a"), "--queue filters --all"),
    (("jobs", "cancel", "--all", "--created-before", "yesterday"), "created_before: "),
    (("dlq", "retry", "--all", "--queue", "a b"), "queue: not a valid name"),
]


def test_flask_bulk_commands_refuse_in_one_error_line(conveyor):
    waiting = conveyor.submit("t.noop", queue="a")
    for args, reason in CLI_REFUSALS:
        result = cli(*args, check=False)
        assert result.exit_code != 0, args
        assert result.stdout == "" and reason in result.stderr, (args, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("Error: "), result.stderr
    assert conveyor.job(waiting).status == S.AVAILABLE


def test_the_python_client_retries_and_cancels_in_bulk(conveyor, gunicorn):
    server = gunicorn()
    conveyor.submit_many("t.noop", [{}] * 3, queue="hooks")
    dead_letter(3)
    waiting = conveyor.submit_many("t.noop", [{}] * 2, queue="mail", delay_s=3600)
    with Conveyor(server.url, keys.create("ops", "admin")[1]) as admin:
        assert admin.dlq.retry_all(queue="hooks", type="t.noop") == 3
        assert admin.dlq.retry_all() == 0
        assert admin.jobs.cancel_all(queue="mail", created_before="2000-01-01T00:00:00Z") == 0
        assert admin.jobs.cancel_all(queue="mail") == 2
        with pytest.raises(Invalid) as refused:
            admin.jobs.cancel_all(created_before="tomorrow")
        assert refused.value.status == 422
        assert refused.value.errors[0].startswith("created_before: ")
    assert set(statuses(waiting).values()) == {S.CANCELLED}
