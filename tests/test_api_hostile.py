"""Hostile input (SPEC §6: no request, however malformed, gets a 500 or a stack trace; no
input reaches SQL except through bound parameters): every case below is a 4xx with a
problem document, and nothing is stored; data that merely looks dangerous is stored and
returned byte for byte.
"""
import base64
import json
import socket

import pytest
import requests

from apiserver import admin_key, api_with, bearer, gunicorn  # noqa: F401 (fixtures)
from models import ApiKey, Job, Schedule

SQL = "'; DROP TABLE jobs; --"
NUL = "\u0000"
LONE_SURROGATE = "\ud800"


def cursor_of(value):
    return base64.urlsafe_b64encode(json.dumps({"after": value}).encode()).decode()


def raw(body, content_type="application/json"):
    return {"data": body, "content_type": content_type}


def nested(depth):
    return "[" * depth + "]" * depth


# (what, method, path, request keyword arguments, expected status or None for "any 4xx")
CASES = [
    ("deeply nested body", "POST", "/v1/jobs", raw(nested(100_000)), 400),
    ("nested just past the limit", "POST", "/v1/jobs",
     raw('{"type": "t.noop", "payload": {"a": ' + nested(64) + "}}"), 400),
    ("nested batch", "POST", "/v1/jobs/batch", raw('{"jobs": ' + nested(5000) + "}"), 400),
    ("huge type string", "POST", "/v1/jobs", {"json": {"type": "t" * 1_000_000}}, 422),
    ("huge queue string", "POST", "/v1/jobs",
     {"json": {"type": "t.noop", "queue": "q" * 100_000}}, 422),
    ("number beyond float", "POST", "/v1/jobs", raw('{"type": "t.noop", "priority": 1e400}'), 400),
    ("float beyond float in payload", "POST", "/v1/jobs",
     raw('{"type": "t.noop", "payload": {"x": -1e999}}'), 400),
    ("integer with 5000 digits", "POST", "/v1/jobs",
     raw('{"type": "t.noop", "payload": {"x": ' + "9" * 5000 + "}}"), 400),
    ("huge priority", "POST", "/v1/jobs", raw('{"type": "t.noop", "priority": ' + "9" * 400 + "}"), 422),
    ("huge delay", "POST", "/v1/jobs", {"json": {"type": "t.noop", "delay_s": 1e308}}, 422),
    ("huge max_attempts", "POST", "/v1/jobs", {"json": {"type": "t.noop", "max_attempts": 2 ** 70}}, 422),
    ("NaN", "POST", "/v1/jobs", raw('{"type": "t.noop", "timeout_s": NaN}'), 400),
    ("Infinity", "POST", "/v1/jobs", raw('{"type": "t.noop", "payload": {"x": Infinity}}'), 400),
    ("run_at past year 9999 in UTC", "POST", "/v1/jobs",
     {"json": {"type": "t.noop", "run_at": "9999-12-31T23:59:59-23:59"}}, 422),
    ("run_at before year 1 in UTC", "POST", "/v1/jobs",
     {"json": {"type": "t.noop", "run_at": "0001-01-01T00:00:00+23:59"}}, 422),
    ("run_at nonsense", "POST", "/v1/jobs", {"json": {"type": "t.noop", "run_at": "soon"}}, 422),
    ("invalid UTF-8", "POST", "/v1/jobs", raw(b'{"type": "t.noop\xff\xfe"}'), 400),
    ("UTF-16", "POST", "/v1/jobs", raw('{"type": "t.noop"}'.encode("utf-16")), 400),
    ("lone surrogate in type", "POST", "/v1/jobs", raw('{"type": "\\ud800"}'), 422),
    ("NUL in type", "POST", "/v1/jobs", {"json": {"type": f"t.noop{NUL}"}}, 422),
    ("NUL in queue", "POST", "/v1/jobs", {"json": {"type": "t.noop", "queue": f"a{NUL}b"}}, 422),
    ("NUL in idempotency_key", "POST", "/v1/jobs",
     {"json": {"type": "t.noop", "idempotency_key": f"k{NUL}"}}, 422),
    ("NUL byte in the raw body", "POST", "/v1/jobs", raw(b'{"type": "t.noop"}\x00'), 400),
    ("SQL in type", "POST", "/v1/jobs", {"json": {"type": SQL}}, 422),
    ("SQL in queue", "POST", "/v1/jobs", {"json": {"type": "t.noop", "queue": SQL}}, 422),
    ("SQL in run_at", "POST", "/v1/jobs", {"json": {"type": "t.noop", "run_at": SQL}}, 422),
    ("SQL as priority", "POST", "/v1/jobs", {"json": {"type": "t.noop", "priority": SQL}}, 422),
    ("SQL as a field name", "POST", "/v1/jobs", {"json": {"type": "t.noop", SQL: 1}}, 422),
    ("SQL in a batch", "POST", "/v1/jobs/batch", {"json": {"jobs": [{"type": SQL}]}}, 422),
    ("SQL in the status filter", "GET", f"/v1/jobs?status={SQL}", {}, 422),
    ("SQL in the type filter", "GET", f"/v1/jobs?type={SQL}", {}, 422),
    ("SQL in the queue filter", "GET", f"/v1/dlq?queue={SQL}", {}, 422),
    ("SQL in the limit", "GET", "/v1/jobs?limit=1;DELETE FROM jobs", {}, 422),
    ("SQL in the cursor", "GET", f"/v1/jobs?cursor={SQL}", {}, 422),
    ("SQL inside a cursor", "GET", f"/v1/jobs?cursor={cursor_of(SQL)}", {}, 422),
    ("cursor past 64 bits", "GET", f"/v1/jobs?cursor={cursor_of(2 ** 80)}", {}, 422),
    ("cursor with a float", "GET", f"/v1/jobs?cursor={cursor_of(1e300)}", {}, 422),
    ("cursor of invalid UTF-8", "GET",
     "/v1/jobs?cursor=" + base64.urlsafe_b64encode(b"\xff\xfe").decode(), {}, 422),
    ("lone surrogate in a schedule cursor", "GET",
     f"/v1/schedules?cursor={cursor_of(LONE_SURROGATE)}", {}, 422),
    ("NUL in a schedule cursor", "GET", f"/v1/schedules?cursor={cursor_of(f'a{NUL}')}", {}, 422),
    ("cursor nested past the recursion limit", "GET",
     "/v1/schedules?cursor=" + base64.urlsafe_b64encode(nested(5000).encode()).decode(), {}, 422),
    ("cron that never fires", "POST", "/v1/schedules",
     {"json": {"name": "feb30", "cron": "0 0 30 2 *", "type": "t.noop"}}, 422),
    ("timezone naming a directory of the zone database", "POST", "/v1/schedules",
     {"json": {"name": "tz", "cron": "* * * * *", "type": "t.noop", "timezone": "America"}}, 422),
    ("NUL in a schedule name", "POST", "/v1/schedules",
     {"json": {"name": f"a{NUL}", "cron": "* * * * *", "type": "t.noop"}}, 422),
    ("NUL in a filter", "GET", "/v1/jobs?queue=a%00b", {}, 422),
    ("invalid UTF-8 in a filter", "GET", "/v1/jobs?type=%ff%fe", {}, 422),
    ("SQL in the job id", "GET", "/v1/jobs/1%20OR%201=1", {}, 404),
    ("job id past 64 bits", "GET", f"/v1/jobs/{2 ** 64}", {}, 404),
    ("job id past 64 bits to cancel", "POST", f"/v1/jobs/{10 ** 30}/cancel", {}, 404),
    ("job id past 64 bits to retry", "POST", f"/v1/dlq/{10 ** 30}/retry", {}, 404),
    ("job id past 64 bits to discard", "DELETE", f"/v1/dlq/{10 ** 30}", {}, 404),
    ("job id zero", "GET", "/v1/jobs/0", {}, 404),
    ("negative job id", "GET", "/v1/jobs/-1", {}, 404),
    ("text/plain", "POST", "/v1/jobs", raw('{"type": "t.noop"}', "text/plain"), 415),
    ("form", "POST", "/v1/jobs", raw("type=t.noop", "application/x-www-form-urlencoded"), 415),
    ("multipart", "POST", "/v1/jobs/batch", raw("--x--", "multipart/form-data; boundary=x"), 415),
    ("xml", "POST", "/v1/jobs", raw("<job type='t.noop'/>", "application/xml"), 415),
    ("no content type", "POST", "/v1/jobs", raw('{"type": "t.noop"}', None), 415),
    ("empty body", "POST", "/v1/jobs", raw(""), 400),
    ("JSON null", "POST", "/v1/jobs", raw("null"), 422),
    ("JSON string", "POST", "/v1/jobs/batch", raw('"jobs"'), 422),
    ("trailing garbage", "POST", "/v1/jobs", raw('{"type": "t.noop"} {"type": "t.noop"}'), 400),
    ("unknown method", "BREW", "/v1/jobs", {}, 405),
    ("TRACE", "TRACE", "/v1/jobs/batch", {}, 405),
]


def test_hostile_requests_are_4xx_problems_and_store_nothing(api_with):
    api = api_with(MAX_PAYLOAD_BYTES=2_000_000)
    key = api.key("admin", "admin")
    wrong = []
    for what, method, path, kwargs, expected in CASES:
        response = api.call(method, path, key, **kwargs)
        body = response.get_data()
        ok = (response.status_code == expected
              and response.mimetype == "application/problem+json"
              and json.loads(body)["status"] == expected and len(body) < 4000
              and b"Traceback" not in body)
        if not ok:
            wrong.append(f"{what}: {response.status_code} {body[:300]!r}")
    assert wrong == []
    assert Job.select().count() == 0 and ApiKey.select().count() == 1
    assert Schedule.select().count() == 0
    assert api.call("GET", "/v1/jobs", key).status_code == 200  # the tables are all still there


@pytest.mark.parametrize("header", [
    {"Authorization": f"Bearer {SQL}"}, {"X-API-Key": SQL}, {"X-API-Key": "k" * 5000},
    {"Authorization": "Bearer " + "\u00ff" * 50}, {"Authorization": "Bearer\tx"},
    {"Authorization": "Bearer cvy_' OR '1'='1"},
])
def test_hostile_keys_are_401(api_with, header):
    api = api_with(AUTH_FAIL_LIMIT="1000/minute")
    response = api.client.get("/v1/jobs", headers={
        k: v.encode().decode("latin-1") for k, v in header.items()})
    assert response.status_code == 401 and response.mimetype == "application/problem+json"


def test_data_that_looks_dangerous_is_stored_and_returned_exactly(api_with):
    api = api_with(MAX_PAYLOAD_BYTES=2_000_000)
    key = api.key("admin", "admin")
    payload = {SQL: SQL, "nul": f"a{NUL}b", NUL: [NUL], "quote": "\"'`\\", "emoji": "\U0001f4a5",
               "deep": json.loads(nested(60)), "big": 10 ** 300, "small": -1e-300,
               "long": "x" * 1_000_000, "unicode": "Stra\u00dfe \u202e \ufeff"}
    response = api.call("POST", "/v1/jobs", key, json={"type": "t.noop", "payload": payload},
                        headers={"Idempotency-Key": SQL})
    assert response.status_code == 201
    job = response.get_json()
    assert job["payload"] == payload and job["idempotency_key"] == SQL
    assert api.call("GET", f"/v1/jobs/{job['id']}", key).get_json()["payload"] == payload
    assert api.conveyor.job(job["id"]).payload == payload
    replay = api.call("POST", "/v1/jobs", key, json={"type": "t.noop", "payload": payload},
                      headers={"Idempotency-Key": SQL})
    assert replay.status_code == 200 and Job.select().count() == 1


def test_a_batch_nested_to_the_depth_limit_is_taken_and_one_level_more_is_400(api_with):
    """MAX_JSON_DEPTH counts every level, the body's own included: the body, its jobs
    list, a job and its payload are four; the payload's value takes the rest."""
    api = api_with()
    key = api.key("admin", "admin")
    for depth, status in [(64, 201), (65, 400)]:
        value = nested(depth - 4)
        body = '{"jobs": [{"type": "t.noop", "payload": {"n": 1}}, {"type": "t.noop", ' \
               '"payload": {"a": ' + value + '}}]}'
        response = api.call("POST", "/v1/jobs/batch", key, **raw(body))
        assert response.status_code == status, (depth, response.get_json())
    assert Job.select().count() == 2


def test_malformed_http_to_gunicorn_gets_no_500_and_no_traceback(conveyor, gunicorn):
    server = gunicorn(MAX_REQUEST_BYTES=100_000)
    key = admin_key(conveyor)
    host, port = server.url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {key}\r\n".encode()
    garbage = [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/jobs HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"ZZ\r\n{}\r\n0\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"186a0\r\n" + b"x" * 100_000 + b"\r\n186a0\r\n" + b"x" * 100_000 + b"\r\n0\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00",
    ]
    statuses = []
    for request in garbage:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            try:
                conn.sendall(request)
                conn.shutdown(socket.SHUT_WR)
                answer = conn.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""  # refused before reading it all: also not a 500
        statuses.append(answer.split(b"\r\n", 1)[0])
    assert all(not status or b" 4" in status for status in statuses), " | ".join(s.decode() for s in statuses)
    over = requests.post(f"{server.url}/v1/jobs",
                         headers={**bearer(key), "Content-Type": "application/json"},
                         data=b'{"type": "t.noop", "pad": "' + b"x" * 200_000 + b'"}',
                         timeout=10)
    assert over.status_code == 413
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert "Traceback" not in server.log() and Job.select().count() == 0


@pytest.mark.postgres
def test_a_database_outage_is_503_with_retry_after_not_500(postgres_url, monkeypatch, worker_id,
                                                           testrun_uid, tmp_path):
    from core import keys
    from infra import config
    import conftest
    name = f"conveyor_outage_{worker_id}_{testrun_uid[:8]}"
    url = conftest.create_pg_database(name)
    for variable, value in {**conftest.FAST_ENV, "DATABASE_URL": url}.items():
        monkeypatch.setenv(variable, value)
    config.reset()
    import app as app_module  # (its first import makes an app from the environment)
    import models
    client = app_module.create_app().test_client()
    models.upgrade()  # as the release phase does before web starts (`flask db upgrade`)
    key = keys.create("admin", "admin")[1]
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
    conftest.drop_pg_database(name)  # WITH (FORCE): our connection is cut too
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/healthz"),
                         ("GET", "/v1/stats")):
        response = client.open(path, method=method, headers=bearer(key), json={"type": "t.noop"})
        assert response.status_code == 503, (method, path)
        assert response.headers["Retry-After"] == "1"
        assert response.mimetype == "application/problem+json"
