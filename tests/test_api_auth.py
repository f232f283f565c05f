"""API keys, roles and rate limits (SPEC §6, §7): who may call what, and how often.

The matrix walks every operation of the OpenAPI document, so a new route is covered as
soon as it is described (and test_api_openapi.py makes sure it is).
"""
import hashlib
import json
import re
import threading
import time

import pytest

from core import keys
from apiserver import api, api_with, bearer  # noqa: F401 (fixtures)
from conftest import wait_for
import models
from models import ApiKey

KEY_SHAPE = re.compile(r"^cvy_[A-Za-z0-9_-]{43}$")


def operations(api):
    """(method, path template, access) of every operation the app's document describes."""
    paths = api.client.get("/openapi.json").get_json()["paths"]
    return [(method.upper(), path, op["x-access"])
            for path, methods in paths.items() for method, op in methods.items()]


def concrete(path, job_id):
    return path.replace("{job_id}", str(job_id))


def request_for(api, method, path, job_id, headers):
    body = {"type": "echo", "payload": {}}
    if path.endswith("/batch"):
        body = {"jobs": [body]}
    json_body = body if method == "POST" and "{job_id}" not in path else None
    return api.client.open(concrete(path, job_id), method=method, headers=headers,
                           json=json_body)


def test_every_operation_refuses_missing_unknown_and_revoked_keys(api_with):
    api = api_with(AUTH_FAIL_LIMIT="1000/minute")  # this test fails to authenticate a lot
    admin = api.key("admin", "admin")
    revoked = api.key("gone", "admin")
    keys.revoke("gone")
    job_id = api.submit(admin, {"type": "echo"})["id"]
    refusals = []
    for method, path, access in operations(api):
        presented = {"no key": {}, "unknown key": bearer("cvy_" + "x" * 43),
                     "revoked key": bearer(revoked), "empty bearer": {"Authorization": "Bearer "},
                     "basic auth": {"Authorization": "Basic YWRtaW46YWRtaW4="},
                     "unknown X-API-Key": {"X-API-Key": "nope"}}
        for what, headers in presented.items():
            response = request_for(api, method, path, job_id, headers)
            if response.status_code != (200 if access == "public" else 401):
                refusals.append(f"{method} {path} with {what}: {response.status_code}")
            if response.status_code == 401:
                assert response.mimetype == "application/problem+json"
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert response.get_json()["detail"]
    assert refusals == []


def test_submit_keys_are_refused_on_admin_routes_and_admin_keys_are_let_in(api):
    admin, submit = api.key("admin", "admin"), api.key("submitter")
    job_id = api.submit(submit, {"type": "echo"})["id"]
    outcomes = {}
    for method, path, access in operations(api):
        for role, key in (("admin", admin), ("submit", submit)):
            for style in (bearer(key), {"X-API-Key": key}, {"Authorization": f"bearer {key}"}):
                response = request_for(api, method, path, job_id, style)
                outcomes.setdefault((method, path, access, role), set()).add(response.status_code)
    wrong = {}
    for (method, path, access, role), statuses in outcomes.items():
        refused = role == "submit" and access == "admin"
        if refused and statuses != {403}:
            wrong[f"{method} {path} as {role}"] = statuses
        if not refused and statuses & {401, 403}:
            wrong[f"{method} {path} as {role}"] = statuses
    assert wrong == {}


def test_a_submit_key_sees_and_cancels_only_its_own_jobs(api):
    admin, mine, theirs = api.key("admin", "admin"), api.key("mine"), api.key("theirs")
    own = api.submit(mine, {"type": "echo", "payload": {"n": 1}})["id"]
    other = api.submit(theirs, {"type": "echo", "payload": {"n": 2}})["id"]

    for method, path in (("GET", f"/v1/jobs/{other}"), ("POST", f"/v1/jobs/{other}/cancel")):
        response = api.call(method, path, mine)
        assert response.status_code == 404, (method, path)
        assert response.get_json()["detail"] == f"job {other} not found"
    assert [job["id"] for job in api.call("GET", "/v1/jobs", mine).get_json()["items"]] == [own]
    assert api.call("GET", f"/v1/jobs/{own}", mine).status_code == 200
    assert api.call("POST", f"/v1/jobs/{own}/cancel", mine).get_json()["status"] == "cancelled"
    assert api.conveyor.job(other).status == "available"

    everything = api.call("GET", "/v1/jobs", admin).get_json()["items"]
    assert {job["id"] for job in everything} == {own, other}
    assert api.call("POST", f"/v1/jobs/{other}/cancel", admin).status_code == 200


def test_a_revoked_key_is_refused_at_once(api):
    key = api.key("short-lived")
    assert api.call("GET", "/v1/jobs", key).status_code == 200
    api.conveyor.flask("keys", "revoke", "short-lived")
    response = api.call("GET", "/v1/jobs", key)
    assert response.status_code == 401
    assert response.get_json()["detail"] == "the API key is unknown or revoked"


def test_a_submission_reads_its_key_in_the_database_and_a_revoked_key_is_refused_next(api):
    """POST /v1/jobs sends the key lookup (never answered from a cache) and the jobs'
    insert, which on PostgreSQL announces them too when no other submission is under way:
    two statements, each its own transaction, and no more. The request right after a
    revocation is refused."""
    key = api.key("counted")
    api.submit(key, {"type": "t.noop"})  # each statement prepared once per connection
    sent = []
    models.db.obj.query_hooks.append(lambda event: sent.append(event.sql))
    try:
        api.submit(key, {"type": "t.noop"})
    finally:
        models.db.obj.query_hooks.clear()
    assert len(sent) == 2, sent
    assert not models.in_transaction()
    api.conveyor.flask("keys", "revoke", "counted")
    assert api.call("POST", "/v1/jobs", key, json={"type": "t.noop"}).status_code == 401


def test_keys_create_prints_the_key_alone_and_stores_only_its_hash(conveyor):
    result = conveyor.flask("keys", "create", "me", "--admin")
    secret = result.stdout
    assert KEY_SHAPE.match(secret.rstrip("\n")) and secret.count("\n") == 1
    secret = secret.strip()
    [row] = ApiKey.select().dicts()
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps(row, default=str)
    assert (row["name"], row["role"], row["rate_limit"], row["revoked_at"]) == ("me", "admin", None, None)
    second = conveyor.flask("keys", "create", "you").stdout.strip()
    assert second != secret and ApiKey.get(ApiKey.name == "you").role == "submit"


def test_keys_list_revoke_and_reuse_of_a_revoked_name(conveyor):
    conveyor.flask("keys", "create", "ci", "--rate-limit", "10/second")
    taken = conveyor.flask("keys", "create", "ci", check=False)
    assert taken.returncode != 0 and "already an active key named 'ci'" in taken.stderr
    conveyor.flask("keys", "revoke", "ci")
    again = conveyor.flask("keys", "revoke", "ci", check=False)
    assert again.returncode != 0 and "no active key named 'ci'" in again.stderr
    conveyor.flask("keys", "create", "ci", "--admin")

    listed = json.loads(conveyor.flask("keys", "list", "--json").stdout)["items"]
    assert [(k["name"], k["role"], k["rate_limit"], k["revoked_at"] is None) for k in listed] == [
        ("ci", "submit", "10/second", False), ("ci", "admin", None, True)]
    assert all(set(k) == {"id", "name", "role", "rate_limit", "created_at", "revoked_at"}
               for k in listed)
    table = conveyor.flask("keys", "list").stdout
    assert "ci" in table and "10/second" in table


@pytest.mark.parametrize("args, message", [
    (["bad name!"], "must match"),
    (["ok", "--rate-limit", "lots"], "is not a rate limit"),
])
def test_keys_create_refuses_bad_input_with_one_line(conveyor, args, message):
    result = conveyor.flask("keys", "create", *args, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert result.stdout == "" and ApiKey.select().count() == 0


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(api_with):
    api = api_with(RATE_LIMIT="3/minute")
    key, other = api.key("busy"), api.key("quiet")
    remaining = []
    for path in ("/v1/jobs", "/v1/jobs?limit=1", "/v1/jobs"):  # one limit across routes
        response = api.call("GET", path, key)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert time.time() < int(response.headers["X-RateLimit-Reset"]) + 1 <= time.time() + 62
        assert "Retry-After" not in response.headers
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]
    refused = api.call("POST", "/v1/jobs", key, json={"type": "echo"})
    assert refused.status_code == 429 and refused.mimetype == "application/problem+json"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "rate limit of 3 per 1 minute" in refused.get_json()["detail"]
    assert api.conveyor.statuses(range(1, 10)) == {}
    assert api.call("GET", "/v1/jobs", other).status_code == 200  # per key
    assert all(api.call("GET", "/healthz").status_code == 200 for _ in range(5))


def test_a_key_created_with_its_own_rate_limit_gets_that_limit(api_with):
    api = api_with(RATE_LIMIT="1/minute")
    key = api.key("bulk", rate_limit="4/minute")
    statuses = [api.call("GET", "/v1/jobs", key).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]


def test_retry_after_is_at_least_one_second_under_a_per_second_limit(api_with):
    api = api_with(RATE_LIMIT="2/second")
    key = api.key("fast")
    refused = next(response for response in (api.call("GET", "/v1/jobs", key) for _ in range(50))
                   if response.status_code == 429)
    assert refused.headers["Retry-After"] == "1"


def test_failed_authentication_is_limited_per_client_address(api_with):
    api = api_with(AUTH_FAIL_LIMIT="3/minute")
    good = api.key("good")
    attacker = {"REMOTE_ADDR": "203.0.113.9"}
    guesses = [api.client.get("/v1/jobs", headers=bearer(f"cvy_guess{i}"),
                              environ_base=attacker) for i in range(5)]
    assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
    assert 1 <= int(guesses[3].headers["Retry-After"]) <= 60
    assert guesses[3].mimetype == "application/problem+json"
    # A valid key is verified first: failures, even from its own address, never refuse it.
    assert api.client.get("/v1/jobs", headers=bearer(good),
                          environ_base=attacker).status_code == 200
    assert api.client.get("/v1/jobs", headers=bearer("cvy_guess"),
                          environ_base=attacker).status_code == 429
    assert api.client.get("/v1/jobs", headers=bearer("cvy_guess"),
                          environ_base={"REMOTE_ADDR": "198.51.100.7"}).status_code == 401
    assert api.client.get("/healthz", environ_base=attacker).status_code == 200


def test_a_request_counted_in_memory_starts_no_thread(api):
    """limits' own memory storage starts a 10 ms timer thread at every count that finds its
    last one ended: below 100 requests a second, a new thread in the way of each response.
    The web process's memory storage starts none."""
    key = api.key("steady")
    assert api.call("GET", "/v1/jobs", key).status_code == 200
    assert [thread for thread in threading.enumerate()
            if isinstance(thread, threading.Timer)] == []


def test_the_memory_storage_forgets_the_windows_that_ended():
    """...and its memory stays bounded: windows that ended are dropped as it counts."""
    from app import MemoryStorage
    storage = MemoryStorage("memory://")
    storage.sweep_every_s = 0.05
    storage.incr("short", expiry=0.05)
    storage.incr("long", expiry=60)
    wait_for(lambda: storage.incr("other", expiry=60) and "short" not in storage.expirations,
             message="the ended window to be dropped")
    assert storage.get("long") == 1 and storage.get("other") >= 1
    assert "short" not in storage.storage and "short" not in storage.locks
