"""`webhook.post` against a real HTTP receiver run by the test, with real workers: the
receiver's answer decides success, retry or dead letter, every attempt carries the
same Idempotency-Key, and a receiver on our own network is reached only when
OUTBOUND_ALLOW lists it."""
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.errors import Invalid
from handlers.webhook import EXCERPT_BYTES, retry_after_seconds


@dataclass
class Answer:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict = field(default_factory=dict)
    hang_s: float = 0.0  # wait this long (or until the test ends) before answering


@dataclass
class Received:
    path: str
    headers: dict
    body: object
    at: float


class Receiver:
    """An HTTP server on a free port of a loopback address (HTTPS given an ssl context):
    counts connections, records every POST and answers each path from its script, in
    order (the last answer repeats)."""

    def __init__(self, host="127.0.0.1", tls=None):
        self.connections = 0
        self.received = []
        self.scripts = {}
        self.closing = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append(Received(self.path, dict(self.headers),
                                                  json.loads(body), time.time()))
                script = receiver.scripts[self.path]
                answer = script.pop(0) if len(script) > 1 else script[0]
                receiver.closing.wait(answer.hang_s)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def verify_request(self, request, client_address):
                receiver.connections += 1
                return True

        self.server = Server((host, 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "http" if tls is None else "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def script(self, path, *answers, host=None):
        """Answer POSTs to path with these answers; returns the URL to post to (naming
        the receiver by host, when given, instead of its address)."""
        self.scripts[path] = list(answers)
        address, port = self.server.server_address
        return f"{self.scheme}://{host or address}:{port}{path}"

    def requests_to(self, path):
        return [r for r in self.received if r.path == path]

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    instance = Receiver()
    yield instance
    instance.close()


def test_2xx_succeeds_with_status_and_a_bounded_excerpt(conveyor, receiver):
    url = receiver.script("/ok", Answer(201, b"x" * 10_000))
    body = {"event": "order.paid", "order": 42}
    job_id = conveyor.submit("webhook.post", {"url": url, "body": body,
                                              "headers": {"X-Signature": "sha256=abc"}})
    conveyor.start_supervisor(OUTBOUND_ALLOW="127.0.0.1")

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert job.status == "succeeded"
    assert job.result == {"status": 201, "response": "x" * EXCERPT_BYTES}
    [request] = receiver.requests_to("/ok")
    assert request.body == body
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Signature"] == "sha256=abc"
    assert request.headers["Idempotency-Key"] == str(job_id)  # no key submitted: the job id


def test_5xx_is_retried_with_the_same_idempotency_key(conveyor, receiver):
    url = receiver.script("/flaky", Answer(500, b"database down"), Answer(200))
    job_id = conveyor.submit("webhook.post", {"url": url, "body": {"n": 1}},
                             idempotency_key="order-42-paid")
    conveyor.start_supervisor(OUTBOUND_ALLOW="127.0.0.1")

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.result["status"]) == ("succeeded", 200)
    first, second = conveyor.attempts(job_id)
    assert (first.status, first.error_type) == ("failed", "ReceiverError")
    assert "500" in first.error_message and "database down" in first.error_message
    assert second.status == "succeeded"
    keys = [r.headers["Idempotency-Key"] for r in receiver.requests_to("/flaky")]
    assert keys == ["order-42-paid", "order-42-paid"]


@pytest.mark.parametrize("status", [404, 301])
def test_4xx_and_redirects_are_permanent(conveyor, receiver, status):
    url = receiver.script("/gone", Answer(status, b"no such hook", {"Location": "/elsewhere"}))
    job_id = conveyor.submit("webhook.post", {"url": url, "body": {}})
    conveyor.start_supervisor(OUTBOUND_ALLOW="127.0.0.1")

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.dead_reason) == ("dead", "permanent")
    [attempt] = conveyor.attempts(job_id)
    assert attempt.error_type == "Permanent" and str(status) in attempt.error_message
    assert len(receiver.requests_to("/gone")) == 1


def test_429_is_retried_when_retry_after_says(conveyor, receiver):
    # BACKOFF_MAX_S is 0.5 in the tests: only the header can make the retry wait 1 s.
    url = receiver.script("/busy", Answer(429, b"slow down", {"Retry-After": "1"}), Answer(200))
    job_id = conveyor.submit("webhook.post", {"url": url, "body": {}})
    conveyor.start_supervisor(OUTBOUND_ALLOW="127.0.0.1")

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert job.status == "succeeded"
    first, second = receiver.requests_to("/busy")
    assert 0.9 <= second.at - first.at < 5
    assert conveyor.attempts(job_id)[0].error_type == "RetryAfter"


def test_a_hung_receiver_times_out_and_is_retried(conveyor, receiver):
    url = receiver.script("/hang", Answer(200, hang_s=30), Answer(200, b"late but fine"))
    job_id = conveyor.submit("webhook.post", {"url": url, "body": {}, "timeout_s": 0.3})
    conveyor.start_supervisor(OUTBOUND_ALLOW="127.0.0.1")

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.result) == ("succeeded", {"status": 200, "response": "late but fine"})
    first, _ = conveyor.attempts(job_id)
    assert (first.status, first.error_type) == ("failed", "ReadTimeout")
    assert first.finished_at - first.started_at < 5
    keys = {r.headers["Idempotency-Key"] for r in receiver.requests_to("/hang")}
    assert keys == {str(job_id)}


@pytest.mark.parametrize("payload", [
    {"url": "ftp://example.com/hook", "body": {}},
    {"url": "file:///etc/passwd", "body": {}},
    {"url": "https://example.com/hook\n", "body": {}},
    {"url": "https://example.com/hook", "body": {}, "headers": {"X-Evil": "a\r\nHost: b"}},
    {"url": "https://example.com/hook", "body": {}, "timeout_s": 3600},
    {"body": {}},
])
def test_bad_payloads_are_refused_at_submission(conveyor, payload):
    with pytest.raises(Invalid):
        conveyor.submit("webhook.post", payload)


def test_retry_after_accepts_seconds_and_http_dates():
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    in_two_minutes = format_datetime(now + timedelta(minutes=2), usegmt=True)
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(in_two_minutes, now=now.timestamp()) == 120
    assert retry_after_seconds(format_datetime(now - timedelta(minutes=2), usegmt=True),
                               now=now.timestamp()) == 0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("-5") is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_local_receiver_is_never_reached_unless_outbound_allow_lists_it(conveyor, receiver,
                                                                          host):
    url = receiver.script("/internal", Answer(200), host=host)
    job_id = conveyor.submit("webhook.post", {"url": url, "body": {"secret": "no"}})
    conveyor.start_supervisor()

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.dead_reason) == ("dead", "permanent")
    [attempt] = conveyor.attempts(job_id)
    assert attempt.error_type == "OutboundRefused"
    assert "127.0.0.1" in attempt.error_message and "OUTBOUND_ALLOW" in attempt.error_message
    assert receiver.connections == 0


@pytest.mark.parametrize("allow", ["127.0.0.0/8", "localhost"])
def test_outbound_allow_admits_a_network_or_a_host_name(conveyor, receiver, allow):
    url = receiver.script("/trusted", Answer(200), host="localhost")
    job_id = conveyor.submit("webhook.post", {"url": url, "body": {}})
    conveyor.start_supervisor(OUTBOUND_ALLOW=allow)

    job = conveyor.wait_for_status(job_id, "succeeded", "dead")

    assert (job.status, job.result["status"]) == ("succeeded", 200)
    assert len(receiver.requests_to("/trusted")) == 1


def test_metadata_and_private_addresses_are_refused_before_any_connection(conveyor, tmp_path):
    egress = tmp_path / "egress.log"  # tests/handlers/no_egress.py blocks and records
    targets = {"169.254.169.254": "http://169.254.169.254/latest/meta-data/",
               "10.0.0.1": "http://10.0.0.1/hook",
               "::ffff:169.254.169.254": "http://[::ffff:169.254.169.254]/",
               "fd00:ec2::254": "https://[fd00:ec2::254]/"}
    jobs_by_address = {address: conveyor.submit("webhook.post", {"url": url, "body": {}})
                       for address, url in targets.items()}
    conveyor.start_supervisor(OUTBOUND_ALLOW="127.0.0.1", TEST_EGRESS_LOG=str(egress))

    for address, job_id in jobs_by_address.items():
        job = conveyor.wait_for_status(job_id, "succeeded", "dead")
        assert (job.status, job.dead_reason) == ("dead", "permanent")
        [attempt] = conveyor.attempts(job_id)
        assert attempt.error_type == "OutboundRefused"
        assert f"refused to connect to {address}:" in attempt.error_message
    assert not egress.exists(), egress.read_text()
