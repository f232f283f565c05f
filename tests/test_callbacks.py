"""Signed callbacks (SPEC §12) with real parts on both databases: the app in this process, real
supervisors, and a real HTTP receiver on 127.0.0.1 that checks every signature with the
client's helper and keeps its own record of what it was sent (the oracle the database is
compared with)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import client
from apiserver import api  # noqa: F401 (fixture)
from conftest import wait_for

FAST_CALLBACKS = {"CALLBACK_BACKOFF_BASE_S": "0.1", "CALLBACK_BACKOFF_MAX_S": "0.2",
                  "CALLBACK_TIMEOUT_S": "2"}
ALLOW_LOCAL = {**FAST_CALLBACKS, "OUTBOUND_ALLOW": "127.0.0.1"}


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST (its job, whether its signature
    verified, its document), answers `failures` 500s and then 200, each after delay_s."""

    def __init__(self, secret, failures=0, delay_s=0.0):
        self.secret, self.failures, self.delay_s = secret, failures, delay_s
        self.received = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    client.verify_signature(receiver.secret, body,
                                            self.headers.get(client.SIGNATURE_HEADER))
                    verified = True
                except client.SignatureError:
                    verified = False
                time.sleep(receiver.delay_s)
                with receiver.lock:
                    receiver.received.append((verified, json.loads(body)))
                    failing = len(receiver.received) <= receiver.failures
                self.send_response(500 if failing or not verified else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def jobs(self):
        with self.lock:
            return [document["id"] for _, document in self.received]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(secret, **options):
        made.append(Receiver(secret, **options))
        return made[-1]
    yield make
    for receiver in made:
        receiver.close()


def callback_secret(api, key):
    return api.call("GET", "/v1/me", key).get_json()["callback_secret"]


def job_document(api, key, job_id):
    return api.call("GET", f"/v1/jobs/{job_id}", key).get_json()


def wait_for_callback(api, key, job_id, status, timeout=30.0):
    return wait_for(lambda: (job_document(api, key, job_id).get("callback") or {})
                    .get("status") == status and job_document(api, key, job_id),
                    timeout, interval=0.1, message=f"the callback of job {job_id} to be {status}")


def test_a_callback_is_signed_retried_after_500s_and_marked_delivered(api, conveyor, receivers):
    key = api.key("hooks")
    receiver = receivers(callback_secret(api, key), failures=3)
    submitted = api.submit(key, {"type": "t.noop", "payload": {"n": 1},
                                 "callback_url": receiver.url})
    assert submitted["callback_url"] == receiver.url
    assert submitted["callback"] == {"status": "pending", "attempts": 0, "last_error": None}
    conveyor.start_supervisor(concurrency=1, **ALLOW_LOCAL)

    job = wait_for_callback(api, key, submitted["id"], "delivered")
    assert job["status"] == "succeeded"
    assert job["callback"]["attempts"] >= 4 and job["callback"]["last_error"] is None
    assert all(verified for verified, _ in receiver.received)
    assert receiver.jobs() == [submitted["id"]] * len(receiver.received)
    assert len(receiver.received) == job["callback"]["attempts"]
    _, delivered = receiver.received[-1]
    # The document as GET /v1/jobs/{id} shows it, as it stood when it was sent.
    assert {**delivered, "callback": job["callback"]} == job

    admin = api.key("ops", "admin")

    def counted():
        text = api.call("GET", "/metrics", admin).get_data(as_text=True)
        return 'conveyor_callbacks_delivered_total{type="t.noop"} 1.0' in text and text
    text = wait_for(counted, 15, interval=0.2, message="the delivered callback to be counted")
    assert "conveyor_callbacks_pending 0.0" in text


def test_a_callback_to_a_refused_address_is_never_contacted_and_fails(api, conveyor, receivers):
    key = api.key("hooks")
    receiver = receivers(callback_secret(api, key))
    submitted = api.submit(key, {"type": "t.fail", "max_attempts": 1,
                                 "callback_url": receiver.url})
    conveyor.start_supervisor(concurrency=1, **FAST_CALLBACKS)  # no OUTBOUND_ALLOW

    job = wait_for_callback(api, key, submitted["id"], "failed")
    assert job["status"] == "dead"
    assert "loopback" in job["callback"]["last_error"]
    assert "OUTBOUND_ALLOW" in job["callback"]["last_error"]
    assert job["callback"]["attempts"] == 1  # no point retrying
    assert receiver.received == []


def test_cancelled_and_discarded_jobs_call_back_too(api, conveyor, receivers):
    key = api.key("hooks")
    admin = api.key("ops", "admin")
    receiver = receivers(callback_secret(api, key))
    waiting = api.submit(key, {"type": "t.noop", "delay_s": 3600, "callback_url": receiver.url})
    assert api.call("POST", f"/v1/jobs/{waiting['id']}/cancel", key).status_code == 200
    conveyor.start_supervisor(concurrency=1, **ALLOW_LOCAL)
    assert wait_for_callback(api, key, waiting["id"], "delivered")["status"] == "cancelled"

    dead = api.submit(key, {"type": "t.fail", "max_attempts": 1, "callback_url": receiver.url})
    wait_for_callback(api, key, dead["id"], "delivered")
    assert api.call("DELETE", f"/v1/dlq/{dead['id']}", admin).status_code == 200
    wait_for(lambda: [d["status"] for _, d in receiver.received if d["id"] == dead["id"]]
             == ["dead", "cancelled"], 20, message="the discarded job to call back again")
    assert all(verified for verified, _ in receiver.received)


def test_callbacks_in_flight_survive_a_supervisor_kill_9(api, conveyor, receivers):
    key = api.key("hooks")
    receiver = receivers(callback_secret(api, key), delay_s=0.5)
    response = api.call("POST", "/v1/jobs/batch", key, json={"jobs": [
        {"type": "t.noop", "payload": {"n": n}, "callback_url": receiver.url}
        for n in range(25)]})
    assert response.status_code == 201
    ids = [job["id"] for job in response.get_json()["items"]]
    first = conveyor.start_supervisor(concurrency=2, **ALLOW_LOCAL)
    wait_for(lambda: receiver.received, 30, message="a first delivery under way")
    first.kill_host()  # the supervisor, its workers and its callback sender, at once
    assert len(set(receiver.jobs())) < len(ids)

    conveyor.start_supervisor(concurrency=2, **ALLOW_LOCAL)
    for job_id in ids:
        wait_for_callback(api, key, job_id, "delivered", timeout=60)
    assert set(receiver.jobs()) == set(ids)  # at least once each
    assert all(verified for verified, _ in receiver.received)


def test_me_shows_the_key_its_role_rate_limit_and_callback_secret(api):
    submit_key, admin_key = api.key("alice", rate_limit="7/second"), api.key("ops", "admin")
    alice = api.call("GET", "/v1/me", submit_key).get_json()
    ops = api.call("GET", "/v1/me", admin_key).get_json()
    assert {k: alice[k] for k in ("name", "role", "rate_limit")} == {
        "name": "alice", "role": "submit", "rate_limit": "7/second"}
    assert {k: ops[k] for k in ("name", "role", "rate_limit")} == {
        "name": "ops", "role": "admin", "rate_limit": "100/second"}
    assert len(alice["callback_secret"]) == 64 and alice["callback_secret"] != ops["callback_secret"]
    assert api.call("GET", "/v1/me", submit_key).get_json() == alice
    assert api.call("GET", "/v1/me").status_code == 401


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "https://",
                                 "https://exa mple.com/", "javascript:alert(1)", 17, None,
                                 "https://example.com/" + "a" * 2100])
def test_a_bad_callback_url_is_422_naming_the_field(api, url):
    key = api.key("hooks")
    single, batch = api.refused(key, {"callback_url": url},
                                good={"callback_url": "https://example.com/ok"})
    assert any(error.startswith("callback_url:") for error in single)
    assert all(error.startswith("1: callback_url:") for error in batch)
    assert api.call("GET", "/v1/jobs", key).get_json()["items"] == []


def test_a_job_without_callback_url_shows_no_callback(api):
    key = api.key("hooks")
    job = api.submit(key, {"type": "t.noop"})
    assert "callback" not in job and "callback_url" not in job
    assert "callback" not in job_document(api, key, job["id"])


def test_keys_made_before_the_callbacks_migration_get_a_secret(tmp_path):
    import models
    from playhouse.migrations import Runner
    before = models.db.obj
    try:
        database = models.open_database(f"sqlite:///{tmp_path / 'old.db'}")
        with database.connection_context():
            runner = Runner(database, models.MIGRATIONS_DIR)
            runner.up(target="0010_places_hold_claims")
            for name in ("old-1", "old-2"):
                database.execute_sql("INSERT INTO api_keys (name, key_hash, role, created_at) "
                                     "VALUES (?, ?, 'submit', 0)", (name, f"hash-{name}"))
            assert "0011_callbacks" in runner.up()
            secrets = dict(database.execute_sql(
                "SELECT name, callback_secret FROM api_keys").fetchall())
        assert set(secrets) == {"old-1", "old-2"}
        assert all(len(secret) == 64 for secret in secrets.values())
        assert secrets["old-1"] != secrets["old-2"]
    finally:
        models.db.initialize(before)
