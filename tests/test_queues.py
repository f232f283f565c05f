"""Queue settings (SPEC §11) as operators use them: GET /v1/queues lists every known queue
with its jobs and settings, PATCH /v1/queues/{name} pauses, resumes and limits one (null
clears a limit), every bad setting is a 422 naming it, and `flask queues` and the Python
client do the same. The guarantee: a paused queue starts no attempt on any supervisor
within 2 s, its jobs wait `available` without losing an attempt, a running attempt
finishes, other queues keep running, and a resume lets its jobs run."""
import json
import re
import time

import pytest

from core import jobs, keys
from apiserver import api, gunicorn  # noqa: F401 (fixtures)
from checks import (LONG_LEASE, assert_audit_clean, cli, gate_path, release,
                    running_attempt)
from client import Conveyor, Invalid
from conftest import wait_for
from models import Attempt, Job, QueueSetting

TAKES_EFFECT_S = 2.0  # SPEC §11: a setting holds on every host within this
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def patch(api, key, name, body):
    return api.call("PATCH", f"/v1/queues/{name}", key, json=body)


def listed(api, key):
    response = api.call("GET", "/v1/queues", key)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def attempts_in(queue):
    return list(Attempt.select(Attempt).join(Job, on=(Job.id == Attempt.job_id))
                .where(Job.queue == queue))


def holds_for(seconds, invariant, message):
    """Check invariant() again and again for `seconds`: a thing that must not happen is
    watched for, not waited for."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert invariant(), message
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the API

def test_every_known_queue_is_listed_with_its_jobs_by_status_and_its_settings(api):
    admin = api.key("ops", "admin")
    api.conveyor.submit_many("t.noop", [{}, {}], queue="billing")
    api.conveyor.submit("t.noop", queue="default", delay_s=3600)
    assert patch(api, admin, "idle", {"concurrency": 2}).status_code == 200

    document = listed(api, admin)

    assert document["next_cursor"] is None
    assert [q["name"] for q in document["items"]] == ["billing", "default", "idle"]
    billing, default, idle = document["items"]
    assert billing == {"name": "billing", "counts": {"available": 2}, "paused": False,
                       "concurrency": None, "rate": None, "updated_at": None}
    assert default["counts"] == {"scheduled": 1}
    assert (idle["counts"], idle["paused"], idle["concurrency"], idle["rate"]) == (
        {}, False, 2, None)
    assert RFC3339_UTC.match(idle["updated_at"])
    stats = api.call("GET", "/v1/stats", admin).get_json()
    assert {q["name"]: q["counts"] for q in document["items"] if q["counts"]} == stats["queues"]


def test_patch_pauses_resumes_sets_and_clears_only_what_it_names(api, caplog):
    caplog.set_level("INFO", logger="conveyor.queues")
    admin = api.key("ops", "admin")
    api.conveyor.submit("t.noop", queue="billing")

    paused = patch(api, admin, "billing", {"paused": True})
    assert paused.status_code == 200 and paused.mimetype == "application/json"
    assert paused.get_json() == listed(api, admin)["items"][0]
    assert (paused.get_json()["counts"], paused.get_json()["paused"]) == ({"available": 1}, True)

    limited = patch(api, admin, "billing", {"concurrency": 3, "rate": "10/second"}).get_json()
    assert (limited["paused"], limited["concurrency"], limited["rate"]) == (True, 3, "10/second")
    slower = patch(api, admin, "billing", {"rate": "600/minute"}).get_json()
    assert (slower["concurrency"], slower["rate"]) == (3, "600/minute")
    row = QueueSetting.get(QueueSetting.name == "billing")
    assert (row.rate_count, row.rate_period_s) == (600, 60.0)
    assert slower["updated_at"] >= limited["updated_at"] >= paused.get_json()["updated_at"]

    cleared = patch(api, admin, "billing", {"paused": False, "concurrency": None,
                                            "rate": None}).get_json()
    assert (cleared["paused"], cleared["concurrency"], cleared["rate"]) == (False, None, None)
    hourly = patch(api, admin, "billing", {"rate": "3600/hour"}).get_json()
    assert (hourly["paused"], hourly["concurrency"], hourly["rate"]) == (False, None, "3600/hour")
    assert [r.getMessage() for r in caplog.records if r.name == "conveyor.queues"] == [
        "queue billing: paused", "queue billing: concurrency 3, rate 10/second",
        "queue billing: rate 600/minute",
        "queue billing: resumed, concurrency cleared, rate cleared",
        "queue billing: rate 3600/hour"]


# (body, what its error names): a field, or for the body as a whole "(queue)".
BAD_SETTINGS = [
    ({"concurrency": 0}, "concurrency: "), ({"concurrency": -1}, "concurrency: "),
    ({"concurrency": "x"}, "concurrency: "), ({"concurrency": 1.5}, "concurrency: "),
    ({"concurrency": True}, "concurrency: "), ({"concurrency": 1_000_001}, "concurrency: "),
    ({"rate": "10/day"}, "rate: "), ({"rate": "0/second"}, "rate: "),
    ({"rate": "ten/second"}, "rate: "), ({"rate": 5}, "rate: "),
    ({"rate": "10/second\n"}, "rate: "), ({"rate": "1000001/hour"}, "rate: "),
    ({"paused": "yes"}, "paused: "), ({"paused": None}, "paused: "),
    ({"x": 1}, "('x' was unexpected)"),
    ({"paused": True, "group": "a"}, "('group' was unexpected)"), ({}, "(queue): "),
    ([{"paused": True}], "(queue): "), ("paused", "(queue): "), (5, "(queue): "),
]


def test_every_bad_setting_is_a_422_naming_it_and_changes_nothing(api):
    admin = api.key("ops", "admin")
    for body, named in BAD_SETTINGS:
        response = patch(api, admin, "billing", body)
        assert response.status_code == 422, (body, response.get_json())
        problem = response.get_json()
        assert response.mimetype == "application/problem+json"
        assert problem["title"] == "Invalid setting"
        assert any(named in error for error in problem["errors"]), (body, problem)
    for name in ("no%20spaces", "-leading", "x" * 101, "a%0A"):
        refused = patch(api, admin, name, {"paused": True})
        assert refused.status_code == 422, name
        assert refused.get_json()["errors"][0].startswith("name: "), name
    not_json = api.call("PATCH", "/v1/queues/billing", admin, data="{paused",
                        content_type="application/json")
    assert not_json.status_code == 400
    assert QueueSetting.select().count() == 0
    assert listed(api, admin)["items"] == []


def test_the_queue_routes_need_an_admin_key(api):
    submit = api.key("app")
    for method, body in (("GET", None), ("PATCH", {"paused": True})):
        path = "/v1/queues" if method == "GET" else "/v1/queues/billing"
        assert api.call(method, path, submit, json=body).status_code == 403
        assert api.call(method, path, json=body).status_code == 401
    assert QueueSetting.select().count() == 0
    assert api.call("GET", "/v1/queues", api.key("ops", "admin"),
                    query_string="limit=5").status_code == 422


# ---------------------------------------------------------------------------- the guarantee

def test_a_paused_queue_starts_nothing_on_any_supervisor_and_its_jobs_lose_no_attempt(
        api, tmp_path):
    conveyor, admin = api.conveyor, api.key("ops", "admin")
    gate = gate_path(tmp_path)
    held = conveyor.submit("t.gate", {"gate": gate}, queue="held")
    backlog = conveyor.submit_many("t.sleep", [{"s": 0.2, "n": n} for n in range(40)],
                                   queue="held")
    for _ in range(2):
        conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    running_attempt(conveyor, held, 1)
    wait_for(lambda: len(attempts_in("held")) >= 4, message="every worker busy with the queue")

    assert patch(api, admin, "held", {"paused": True}).get_json()["paused"] is True
    paused_at = jobs.db_time()
    others = conveyor.submit_many("t.noop", [{"n": n} for n in range(10)], queue="other")
    conveyor.wait_until_final(others, timeout=10)
    assert set(conveyor.statuses(others).values()) == {"succeeded"}, "other queues run on"
    holds_for(TAKES_EFFECT_S + 0.5,
              lambda: all(a.started_at <= paused_at + TAKES_EFFECT_S for a in attempts_in("held")),
              "an attempt of the paused queue started more than 2 s after the pause")
    release(gate, 1)
    assert conveyor.wait_for_status(held, "succeeded", timeout=10).attempt == 1

    started = {a.job_id for a in attempts_in("held")}
    waiting = [job_id for job_id in backlog if job_id not in started]
    assert len(waiting) >= 10, "the pause came too late to hold any job back"
    for job_id in waiting:
        job = conveyor.job(job_id)
        assert (job.status, job.attempt) == ("available", 0), job_id
    assert {a.status for a in attempts_in("held")} == {"succeeded"}, \
        "attempts running at the pause finish normally"

    assert patch(api, admin, "held", {"paused": False}).get_json()["paused"] is False
    resumed_at = jobs.db_time()
    first = wait_for(lambda: min((a.started_at for a in attempts_in("held")
                                  if a.job_id in waiting), default=None),
                     timeout=10, message="the resumed queue's first attempt")
    assert first - resumed_at <= TAKES_EFFECT_S
    conveyor.wait_until_final(backlog, timeout=20)
    for job_id in backlog:
        assert [(a.number, a.status) for a in conveyor.attempts(job_id)] == [(1, "succeeded")]
    assert_audit_clean(conveyor)


# ---------------------------------------------------------------------------- CLI, client

def test_flask_queues_pauses_resumes_sets_and_lists(api):
    admin = api.key("ops", "admin")
    api.conveyor.submit("t.noop", queue="billing")

    assert cli("queues", "pause", "billing").stdout == "queue billing paused\n"
    assert cli("queues", "set", "billing", "--concurrency", "4", "--rate", "10/second").stdout \
        == "queue billing (paused): concurrency 4, rate 10/second\n"
    table = cli("queues", "list").stdout.splitlines()
    assert table[0].split()[:4] == ["queue", "paused", "concurrency", "rate"]
    assert table[1].split()[:6] == ["billing", "yes", "4", "10/second", "0", "1"]
    assert cli("queues", "set", "billing", "--rate", "none").stdout == \
        "queue billing (paused): concurrency 4, rate none\n"
    assert cli("queues", "resume", "billing").stdout == "queue billing resumed\n"
    assert cli("queues", "set", "billing", "--concurrency", "none").stdout == \
        "queue billing: concurrency none, rate none\n"
    assert json.loads(cli("queues", "list", "--json").stdout) == listed(api, admin)


CLI_REFUSALS = [
    (("queues", "set", "q", "--concurrency", "0"), "concurrency: 0 is less than the minimum of 1"),
    (("queues", "set", "q", "--concurrency", "x"), "concurrency: 'x' is not of type"),
    (("queues", "set", "q", "--rate", "10/day"), "rate: '10/day' is not N/second"),
    (("queues", "set", "q"), "(queue): {} should be non-empty"),
    (("queues", "pause", "no spaces"), "name: "),
]


def test_flask_queues_refuses_in_one_error_line(conveyor):
    for args, reason in CLI_REFUSALS:
        result = cli(*args, check=False)
        assert result.exit_code == 1, args
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("Error: ") and reason in result.stderr, result.stderr
    real = conveyor.flask("queues", "set", "q", "--rate", "ten/second", check=False)
    assert (real.returncode, real.stdout) == (1, "")
    assert real.stderr.startswith("Error: ") and len(real.stderr.splitlines()) == 1
    assert QueueSetting.select().count() == 0


def test_the_python_client_lists_pauses_resumes_and_limits_queues(conveyor, gunicorn):
    server = gunicorn()
    conveyor.submit("t.noop", queue="billing")
    with Conveyor(server.url, keys.create("ops", "admin")[1]) as admin:
        paused = admin.queues.pause("billing")
        assert (paused.name, paused.counts, paused.paused) == ("billing", {"available": 1}, True)
        assert paused.updated_at.tzinfo is not None
        limited = admin.queues.update("billing", concurrency=2, rate="5/minute")
        assert (limited.paused, limited.concurrency, limited.rate) == (True, 2, "5/minute")
        assert admin.queues.resume("billing").paused is False
        cleared = admin.queues.update("billing", rate=None)
        assert admin.queues.list() == [cleared]
        with pytest.raises(Invalid) as refused:
            admin.queues.update("billing", concurrency=0)
        assert refused.value.status == 422 and refused.value.errors[0].startswith("concurrency")
