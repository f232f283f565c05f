"""Strict input and bounded bodies (SPEC §6, issue 12): a body over MAX_REQUEST_BYTES is 413
however it is sent, and the web process gives the memory of large bodies back; times in
are RFC 3339 with an offset and ids ASCII digits, nothing looser; what gunicorn refuses
itself is problem+json too, and no request is redirected to another site.
"""
import http.client
import json
import socket
import threading

import pytest

from apiserver import admin_key, api, bearer, gunicorn  # noqa: F401 (fixtures)
from bench.web_memory import RssSampler, max_batch_body, settled_rss
from models import Job

LIMIT = 100_000
# Measured with bench/web_memory.py, on SQLite and PostgreSQL alike: 2.1x to 4.2x (6.4x to
# 8.4x before issue 12: one insert statement for the whole batch, and a heap that kept it).
PEAK_PER_BYTE_IN_FLIGHT = 5


def host_port(server):
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def post_chunked(server, key, body, path="/v1/jobs"):
    """POST body with Transfer-Encoding: chunked (no Content-Length), 8 KB a chunk."""
    conn = http.client.HTTPConnection(*host_port(server), timeout=30)
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    conn.request("POST", path, body=chunks, encode_chunked=True,
                 headers={**bearer(key), "Content-Type": "application/json",
                          "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    answer = response.status, response.getheader("Content-Type"), response.read()
    conn.close()
    return answer


def job_of_size(size):
    """A valid job submission of exactly `size` bytes."""
    frame = b'{"type": "t.noop", "payload": {"pad": ""}}'
    return frame[:-3] + b"x" * (size - len(frame)) + frame[-3:]


def raw_exchange(server, request):
    """Send raw bytes to gunicorn; (status line, headers, body) of its answer."""
    with socket.create_connection(host_port(server), timeout=10) as conn:
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    return status, dict(line.lower().split(": ", 1) for line in headers), body


def test_a_chunked_body_over_the_limit_is_413_and_never_cut_short(conveyor, gunicorn):
    server = gunicorn(MAX_REQUEST_BYTES=LIMIT)
    key = admin_key(conveyor)
    whole = job_of_size(LIMIT)
    for extra in (b" ", b"garbage", b" " * 100_000):
        status, content_type, body = post_chunked(server, key, whole + extra)
        assert (status, content_type) == (413, "application/problem+json"), body[:300]
        assert json.loads(body)["status"] == 413
    assert Job.select().count() == 0
    status, _, body = post_chunked(server, key, whole)  # exactly at the limit
    assert status == 201, body[:300]
    assert json.loads(body)["payload"]["pad"] == "x" * (LIMIT - 42)
    batch = json.dumps({"jobs": [{"type": "t.noop"}] * 10}).encode()
    status, _, body = post_chunked(server, key, batch, "/v1/jobs/batch")
    assert status == 201 and len(json.loads(body)["items"]) == 10
    assert Job.select().count() == 11


def test_max_batches_leave_the_web_process_near_its_baseline(conveyor, gunicorn):
    """Three maximum batches (1,000 jobs x 16 KB, about 16 MB) one after the other, then
    four at once: the worker's RSS comes back near its baseline afterwards, and its peak
    stays under PEAK_PER_BYTE_IN_FLIGHT times the bytes in flight above where it started."""
    server = gunicorn()
    key = admin_key(conveyor)
    [worker] = server.worker_pids()
    body = max_batch_body("t.noop")
    statuses = []

    def send():
        conn = http.client.HTTPConnection(*host_port(server), timeout=120)
        conn.request("POST", "/v1/jobs/batch", body=body,
                     headers={**bearer(key), "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
        conn.close()

    send()  # warm-up: what the first batch loads (caches, code) stays, as it should
    baseline = settled_rss(RssSampler(worker))
    growth = []
    for at_once in (1, 1, 1, 4):
        sampler = RssSampler(worker)
        before = sampler.rss()
        sampler.start()
        clients = [threading.Thread(target=send) for _ in range(at_once)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        growth.append((sampler.stop() - before) / (len(body) * at_once))
    after = settled_rss(RssSampler(worker))
    assert statuses == [201] * 8
    assert after - baseline < 2 * len(body), (baseline, after)
    assert max(growth) < PEAK_PER_BYTE_IN_FLIGHT, growth


@pytest.mark.parametrize("run_at", [
    "2030-01-01 00:00:00Z", "2030-01-01t00:00:00z", "2030-01-01T00:00:00z",
    "2030-01-01t00:00:00Z", "2030-W01-1T00:00:00Z", "2030-001T00:00:00Z",
    "2030-01-01T00:00:00+0000", "2030-01-01T00:00:00+00", "2030-01-01T00:00:00Z\u0000",
    " 2030-01-01T00:00:00Z", "2030-01-01T00:00:00Z\n", "2030-01-01T00:00:00",
    "2030-01-01", "20300101T000000Z", "2030-01-01T00:00Z", "2030-01-01T00:00:00.Z",
    "\uff12030-01-01T00:00:00Z", "2030-01-01T00:00:00\u066bZ", "2030-13-01T00:00:00Z",
    "2030-01-01T00:00:00+24:00",
])
def test_run_at_looser_than_rfc_3339_is_422_naming_the_field(api, run_at):
    key = api.key("submitter")
    response = api.call("POST", "/v1/jobs", key, json={"type": "t.noop", "run_at": run_at})
    assert response.status_code == 422 and response.mimetype == "application/problem+json"
    assert [error.split(":")[0] for error in response.get_json()["errors"]] == ["run_at"]
    assert Job.select().count() == 0


def test_run_at_in_rfc_3339_is_taken_with_any_offset_and_fraction(api):
    key = api.key("submitter")
    for run_at in ("2030-01-01T00:00:00Z", "2030-01-01T05:30:00+05:30",
                   "2029-12-31T19:00:00.000-05:00", "2030-01-01T00:00:00.123456789Z"):
        job = api.submit(key, {"type": "t.noop", "run_at": run_at})
        assert job["run_at"].startswith("2030-01-01T00:00:00.")


@pytest.mark.parametrize("spelling", ["007", "01", "%D9%A1", "%EF%BC%91", "%DB%B1", "1%20",
                                      "+1", "1.0", "1e0", "0x1"])
def test_a_job_id_is_ascii_digits_without_a_leading_zero(api, spelling):
    key = api.key("admin", "admin")
    assert api.conveyor.submit("t.noop") == 1
    assert api.call("GET", "/v1/jobs/1", key).status_code == 200
    for method, path in (("GET", "/v1/jobs/{}"), ("POST", "/v1/jobs/{}/cancel"),
                         ("POST", "/v1/dlq/{}/retry"), ("DELETE", "/v1/dlq/{}")):
        response = api.call(method, path.format(spelling), key)
        assert response.status_code == 404, (method, path)
        assert response.mimetype == "application/problem+json"
    assert api.conveyor.job(1).status == "available"
    response = api.call("GET", f"/v1/jobs?limit={spelling}", key)
    assert response.status_code == 422 and response.get_json()["errors"][0].startswith("limit:")


def test_gunicorns_own_refusals_are_problem_json(conveyor, gunicorn):
    server = gunicorn()
    cases = [
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ]
    for request, expected in cases:
        status, headers, body = raw_exchange(server, request)
        assert status.split(" ")[1] == str(expected), (request[:40], status)
        assert headers["content-type"] == "application/problem+json", (request[:40], body)
        assert json.loads(body)["status"] == expected
        assert int(headers["content-length"]) == len(body)
    assert "Traceback" not in server.log()


def test_no_path_is_redirected_to_another_site(conveyor, gunicorn):
    server = gunicorn()
    key = admin_key(conveyor)
    for path in ("//evil.example/v1/jobs", "//v1/jobs", "/v1//jobs", "//evil.example//v1/jobs",
                 "/v1/jobs//", "//healthz", "/\\evil.example/v1/jobs", "/v1/jobs/",
                 "///evil.example/v1/jobs"):
        for host in ("evil.example", "localhost"):
            status, headers, body = raw_exchange(server, (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Connection: close\r\n\r\n").encode())
            code = int(status.split(" ")[1])
            assert "location" not in headers and not 300 <= code < 400, (path, host, status)
            assert code == 200 or headers["content-type"] == "application/problem+json"
