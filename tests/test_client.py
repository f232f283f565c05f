"""The Python client (client.py) against a real gunicorn serving the app, with real keys, on
both databases, and a real supervisor wherever a job must run: waiting, idempotent
retries, rate limits, database outages, problem documents as exceptions, pages, schedules
and the dead-letter queue. Faults come from the real server or from a real TCP proxy in
front of it, never from a mock."""
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from urllib.parse import urlparse

import pytest

from core import keys
from apiserver import Gunicorn, gunicorn  # noqa: F401 (fixture)
from checks import LONG_LEASE, cut_database_connections, jobs_locked
from client import (Conflict, ConnectionFailed, Conveyor, ConveyorError, Forbidden, Invalid,
                    Job, NotFound, RateLimited, TooLarge, Unauthorized, WaitTimeout)
from conftest import wait_for
from models import Job as JobRow

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


def key(name="ops", role="admin", rate_limit=None):
    return keys.create(name, role, rate_limit)[1]


@pytest.fixture
def server(gunicorn):
    return gunicorn()


@pytest.fixture
def connect(server):
    """connect(secret, **options): a client of the server, closed after the test (an open
    keep-alive connection would hold up gunicorn's shutdown)."""
    clients = []

    def make(secret, url=None, **options):
        clients.append(Conveyor(url or server.url, secret, **options))
        return clients[-1]
    yield make
    for client in clients:
        client.close()


@pytest.fixture
def admin(connect):
    return connect(key())


class LosingProxy:
    """A real TCP proxy in front of the server that passes requests on but loses the first
    `lose` responses: it reads the start of the answer, so the server has done the work,
    then closes the client's connection without a byte of it, like a network cut."""

    def __init__(self, upstream_url, lose=1):
        parts = urlparse(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.to_lose, self.lost, self.requests = lose, 0, []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        server = socket.create_connection(self.upstream)
        sent = bytearray()
        with self.lock:
            self.requests.append(sent)

        def requests_in():
            try:
                while data := client.recv(65536):
                    sent.extend(data)
                    server.sendall(data)
                server.shutdown(socket.SHUT_WR)  # the client hung up: so do we
            except OSError:
                pass

        threading.Thread(target=requests_in, daemon=True).start()
        try:
            while data := server.recv(65536):
                with self.lock:
                    lose = self.lost < self.to_lose
                    self.lost += lose
                if lose:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for end in (client, server):  # shutdown wakes the other thread's recv, too
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def idempotency_keys(self):
        with self.lock:
            return re.findall(rb"(?im)^Idempotency-Key: (\S+)\r$", b"".join(self.requests))

    def close(self):
        self.listener.close()


def test_a_submitted_job_is_waited_for_until_it_succeeds(conveyor, admin):
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)

    job = admin.submit("t.flaky", {"succeed_on": 2}, queue="billing", priority=-1)
    assert isinstance(job, Job) and job.status == "available" and job.attempt == 0
    assert (job.type, job.payload, job.queue, job.priority) == ("t.flaky", {"succeed_on": 2},
                                                               "billing", -1)
    assert UUID.match(job.idempotency_key)  # the client's own key
    done = admin.wait(job, timeout=30)

    assert (done.id, done.status, done.result) == (job.id, "succeeded", {"attempt": 2})
    assert [a.status for a in done.attempts] == ["failed", "succeeded"]
    assert done.attempts[0].error_message == "flaky failure on attempt 1"
    assert done.last_error == "RuntimeError: flaky failure on attempt 1"
    assert done.finished and done.finished_at.tzinfo == timezone.utc
    assert done.created_at <= done.attempts[0].started_at <= done.finished_at


def test_wait_gives_up_at_its_timeout_with_the_job_as_last_seen(admin):
    job = admin.submit("t.noop", delay_s=timedelta(hours=1))  # nothing runs it anyway

    started = time.monotonic()
    with pytest.raises(WaitTimeout) as raised:
        admin.wait(job.id, timeout=0.5)

    assert 0.5 <= time.monotonic() - started < 3
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.job.id == job.id and raised.value.job.status == "scheduled"
    assert str(raised.value) == f"job {job.id} is still scheduled after 0.5s"


def test_the_same_explicit_idempotency_key_returns_the_first_job(admin):
    first = admin.submit("t.noop", {"order": 42}, idempotency_key="order-42")
    again = admin.submit("t.noop", {"order": 42}, idempotency_key="order-42")

    assert again.id == first.id and again.idempotency_key == "order-42"
    with pytest.raises(Conflict) as conflict:
        admin.submit("t.noop", {"order": 43}, idempotency_key="order-42")
    assert conflict.value.status == 409
    assert "already used for a different job" in conflict.value.detail
    assert JobRow.select().count() == 1
    # Without a key each call is a new submission with its own key: two calls, two jobs.
    one, two = admin.submit("t.noop", {"order": 42}), admin.submit("t.noop", {"order": 42})
    assert one.id != two.id and one.idempotency_key != two.idempotency_key


def test_a_lost_response_is_retried_with_the_same_automatic_key_and_makes_one_job(server,
                                                                                  connect):
    proxy = LosingProxy(server.url, lose=1)
    try:
        client = connect(key(), url=proxy.url)
        job = client.submit("t.noop", {"n": 1})

        assert proxy.lost == 1  # the first answer never reached the client
        [sent, retried] = proxy.idempotency_keys()
        assert sent == retried == job.idempotency_key.encode() and UUID.match(job.idempotency_key)
        assert [row.id for row in JobRow.select()] == [job.id]

        # A cancel is not safe to repeat once sent: the client says the connection broke
        # rather than guess, and the server did cancel the job.
        proxy.to_lose += 1
        with pytest.raises(ConnectionFailed) as broken:
            client.cancel(job)
        assert broken.value.status is None and "/cancel" in str(broken.value)
        assert client.get(job).status == "cancelled"
    finally:
        proxy.close()


def test_a_rate_limited_client_waits_retry_after_and_succeeds(connect, caplog):
    secret = key("slow", "submit", rate_limit="2/second")
    client = connect(secret)
    caplog.set_level("INFO", logger="conveyor.client")

    started = time.monotonic()
    submitted = [client.submit("t.noop", {"n": n}) for n in range(5)]

    # Five calls at two a second cannot all pass in one window: at least one 429 was waited out.
    retries = [r.getMessage() for r in caplog.records if r.name == "conveyor.client"]
    assert retries and all("429 Too many requests" in line for line in retries), retries
    assert time.monotonic() - started >= 0.9
    assert sorted(row.id for row in JobRow.select()) == sorted(job.id for job in submitted)

    impatient = connect(secret, max_retries=0)
    with pytest.raises(RateLimited) as limited:
        for _ in range(10):
            impatient.list_page(limit=1)
    assert limited.value.status == 429 and limited.value.retry_after >= 1
    assert "over its rate limit of 2 per 1 second" in limited.value.detail


def test_a_database_outage_is_retried_after_retry_after(pg_conveyor, tmp_path, caplog):
    server = Gunicorn({**pg_conveyor.env, "WEB_THREADS": "1"}, tmp_path / "gunicorn.log")
    client = Conveyor(server.url, key())
    try:
        caplog.set_level("INFO", logger="conveyor.client")
        client.stats()  # the server's one thread now holds a connection
        with ThreadPoolExecutor(1) as pool:
            with jobs_locked(pg_conveyor.database_url) as waiting_sessions:
                stats = pool.submit(client.stats)
                wait_for(lambda: waiting_sessions() == 1, message="the request to wait mid-query")
                assert cut_database_connections(server.worker_pids(),
                                                pg_conveyor.database_url) >= 1
            assert stats.result(30).workers_alive == 0
        [retry] = [r.getMessage() for r in caplog.records if r.name == "conveyor.client"]
        assert "503 Service unavailable" in retry and "in 1.00s" in retry
    finally:
        client.close()
        server.stop()


def test_refusals_raise_the_matching_error_with_the_problem_detail(connect, admin):
    submitter = connect(key("submitter", "submit"))
    with pytest.raises(NotFound) as missing:
        admin.get(424242)
    assert (missing.value.status, missing.value.title, missing.value.detail) == (
        404, "Not found", "job 424242 not found")

    with pytest.raises(Invalid) as invalid:
        admin.submit("t.schema", {"to": 5})
    assert invalid.value.status == 422
    assert invalid.value.errors == ["payload/to: 5 is not of type 'string'"]
    assert "does not match the schema of 't.schema'" in str(invalid.value)
    with pytest.raises(Invalid, match="unknown job type 'no.such'"):
        admin.submit("no.such")
    with pytest.raises(Invalid) as both:
        admin.submit("t.noop", run_at=datetime.now(timezone.utc), delay_s=5)
    assert both.value.errors == ["run_at: not allowed with delay_s"]

    job = admin.submit("t.noop", delay_s=60)
    assert admin.cancel(job.id).status == "cancelled"
    with pytest.raises(Conflict, match="is cancelled and cannot be cancelled"):
        admin.cancel(job.id)

    with pytest.raises(TooLarge) as large:
        admin.submit("t.noop", {"blob": "x" * 300_000})
    assert large.value.status == 413 and "over the limit of 262144" in large.value.detail

    with pytest.raises(Forbidden) as forbidden:
        submitter.stats()
    assert forbidden.value.status == 403 and "needs an admin key" in forbidden.value.detail
    with pytest.raises(NotFound):  # another key's job is not found, not forbidden
        submitter.get(job.id)

    with pytest.raises(Unauthorized) as unknown:
        connect("cvy_not-a-key").list_page()
    assert unknown.value.status == 401
    assert unknown.value.detail == "the API key is unknown or revoked"
    assert all(isinstance(e.value, ConveyorError) for e in (missing, invalid, large, unknown))


def test_an_unreachable_server_fails_after_a_bounded_number_of_retries():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    client = Conveyor(f"http://127.0.0.1:{port}", "cvy_any", max_retries=3)

    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as failed:
        client.cancel(1)  # not safe to repeat once sent, but this one was never sent

    assert time.monotonic() - started < 2
    assert "Connection refused" in str(failed.value) and failed.value.status is None


def test_list_iterates_over_every_page_newest_first(connect, admin):
    submitter = connect(key("submitter", "submit"))
    mine = submitter.submit_batch([{"type": "t.noop", "payload": {"n": n}} for n in range(7)]
                                  + [{"type": "t.fail", "idempotency_key": "the-failing-one"}])
    others = admin.submit("t.noop")

    assert [job.payload.get("n") for job in mine] == [0, 1, 2, 3, 4, 5, 6, None]
    assert mine[-1].idempotency_key == "the-failing-one"
    assert all(UUID.match(job.idempotency_key) for job in mine[:-1])
    everything = [others.id, *(job.id for job in reversed(mine))]
    assert [job.id for job in admin.list(page_size=3)] == everything
    assert [job.id for job in submitter.list(type="t.noop", page_size=2)] == [
        job.id for job in reversed(mine[:-1])]
    first = admin.list_page(limit=5)
    second = admin.list_page(limit=5, cursor=first.next_cursor)
    assert len(first.items) == 5 and first.next_cursor
    assert [j.id for j in first.items + second.items] == [j.id for j in admin.list()]
    assert second.next_cursor is None
    assert list(admin.list(status="succeeded")) == []


def test_schedules_round_trip(admin):
    created = admin.schedules.create("nightly", "0 3 * * *", "t.noop", {"n": 1},
                                     timezone="Europe/Berlin")
    assert (created.name, created.cron, created.timezone, created.overlap, created.paused) == (
        "nightly", "0 3 * * *", "Europe/Berlin", "skip", False)
    assert len(created.next_runs) == 5 and created.next_runs[0] == created.next_run_at
    assert created.next_run_at.astimezone(timezone(timedelta(hours=1))).hour in (3, 4)
    with pytest.raises(Conflict):
        admin.schedules.create("nightly", "* * * * *", "t.noop")
    admin.schedules.create("hourly", "0 * * * *", "t.noop")

    assert [s.name for s in admin.schedules.list(page_size=1)] == ["hourly", "nightly"]
    paused = admin.schedules.update("nightly", paused=True)
    assert paused.paused and paused.next_run_at is None and paused.next_runs == []
    resumed = admin.schedules.update("nightly", paused=False, cron="15 * * * *", priority=3)
    assert (resumed.paused, resumed.cron, resumed.priority) == (False, "15 * * * *", 3)
    assert admin.schedules.get("nightly").recent_runs == []
    with pytest.raises(Invalid) as bad_cron:
        admin.schedules.update("nightly", cron="every day")
    assert bad_cron.value.errors[0].startswith("cron: expected 5 fields")

    assert admin.schedules.delete("nightly") is None
    with pytest.raises(NotFound):
        admin.schedules.get("nightly")
    assert [s.name for s in admin.schedules.list()] == ["hourly"]


def test_dead_letter_queue_round_trip_with_stats_and_workers(conveyor, admin):
    supervisor = conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    job = admin.submit("t.permanent", {"message": "card declined"})

    dead = admin.wait(job, timeout=30)
    assert (dead.status, dead.dead_reason, dead.last_error) == (
        "dead", "permanent", "Permanent: card declined")
    assert [j.id for j in admin.dlq.list()] == [job.id]
    assert admin.dlq.list_page(type="t.noop").items == []

    retried = admin.dlq.retry(job)
    assert retried.status == "available" and retried.dead_reason is None
    again = admin.wait(job, timeout=30)
    assert again.status == "dead" and [a.number for a in again.attempts] == [1, 2]
    discarded = admin.dlq.discard(job.id)
    assert discarded.status == "cancelled" and list(admin.dlq.list()) == []
    with pytest.raises(Conflict, match="not in the dead-letter queue"):
        admin.dlq.retry(job)

    # A worker says what it runs at its next heartbeat: wait for both to say "nothing".
    def two_idle_workers():
        workers = admin.workers()
        return len(workers) == 2 and all(w.current_job_id is None for w in workers) and workers
    workers = wait_for(two_idle_workers, message="two idle workers")
    assert sorted(w.pid for w in workers) == sorted(supervisor.worker_pids())
    stats = admin.stats()
    assert stats.totals == {"cancelled": 1} and stats.queues == {"default": {"cancelled": 1}}
    assert stats.workers_alive == 2 and stats.oldest_available_age_s == 0
    assert admin.health() is True
