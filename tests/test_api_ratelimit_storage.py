"""The rate-limit storage going away and coming back (SPEC §13): a private redis-server
(never the shared one) is stopped under a running gunicorn and started again on the same
port. RATE_LIMIT_ON_STORAGE_ERROR says what requests get meanwhile; /healthz and /metrics
say what is going on; limits hold again, without a restart, once Redis answers.
"""
import os
import shutil
import sys
import time

import pytest
import redis
import requests

from apiserver import IN_CI, admin_key, bearer, gunicorn  # noqa: F401 (fixtures)
from conftest import ProcessGroup, free_port, wait_for
from test_observability import scrape, value

WRONG = "cvy_" + "x" * 43


class PrivateRedis:
    """A redis-server of our own on a free port, without persistence: stop() and start()
    it again at will."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = tmp_path / "redis.log"
        self.process = None
        self.start()

    def start(self):
        self.process = ProcessGroup(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"], os.environ, self.log_path)
        wait_for(self.answers, timeout=15, message=f"redis-server on port {self.port}")

    def answers(self):
        try:
            return redis.Redis(port=self.port, socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def stop(self):
        """kill -9: the storage is gone at once, as when its host or network fails."""
        self.process.stop()
        assert not self.answers()


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        message = "rate-limit storage outage tests SKIPPED: no redis-server on PATH"
        if IN_CI:
            pytest.fail(f"CI=true requires redis-server. {message}")
        print(f"\n{message}", file=sys.stderr)
        pytest.skip(message)
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


def get(server, key, path="/v1/jobs"):
    return requests.get(f"{server.url}{path}", headers=bearer(key), timeout=30)


def health(server):
    response = requests.get(f"{server.url}/healthz", timeout=30)
    return response.status_code, response.json()


def limited_statuses(server, key, count):
    return [get(server, key).status_code for _ in range(count)]


def storage_metrics(server, key, **wanted):
    """The scrape once its storage samples are at least `wanted` (counts are flushed to the
    database every HEARTBEAT_S, so they show up a moment later)."""
    def ready():
        samples = scrape(server, key)
        return all(value(samples, name, **labels) >= at_least
                   for name, labels, at_least in wanted.values()) and samples
    return wait_for(ready, timeout=10, message=f"metrics {wanted}")


def test_closed_policy_refuses_with_503_while_redis_is_down_and_limits_return_with_it(
        conveyor, gunicorn, private_redis):
    # REDIS_URL, the platform's convention, is where limits are counted by default.
    server = gunicorn(REDIS_URL=private_redis.url, RATELIMIT_STORAGE_URI="")
    admin = admin_key(conveyor)
    limited = conveyor.flask("keys", "create", "limited", "--rate-limit", "3/minute").stdout.strip()
    assert health(server) == (200, {"status": "ok",
                                    "rate_limit_storage": {"ok": True, "on_error": "closed"}})
    assert limited_statuses(server, limited, 4) == [200, 200, 200, 429]  # counted in Redis
    assert private_redis.answers()

    private_redis.stop()
    refused = get(server, admin)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert "rate-limit storage is unreachable" in refused.json()["detail"]
    assert get(server, WRONG).status_code == 503  # failed authentications cannot be counted
    status, body = health(server)
    assert status == 503 and body["rate_limit_storage"] == {"ok": False, "on_error": "closed"}
    down = storage_metrics(server, admin, refused=(
        "conveyor_rate_limit_storage_errors_total", {"outcome": "refused"}, 2))
    assert value(down, "conveyor_rate_limit_storage_up") == 0  # /metrics is served meanwhile

    private_redis.start()  # empty: its counts were not saved
    wait_for(lambda: health(server)[0] == 200, timeout=10, message="/healthz to recover")
    assert health(server)[1]["rate_limit_storage"] == {"ok": True, "on_error": "closed"}
    assert limited_statuses(server, limited, 4) == [200, 200, 200, 429]
    assert value(scrape(server, admin), "conveyor_rate_limit_storage_up") == 1
    assert "Traceback" not in server.log()


def test_open_policy_lets_requests_through_uncounted_while_redis_is_down(
        conveyor, gunicorn, private_redis):
    server = gunicorn(RATELIMIT_STORAGE_URI=private_redis.url, RATE_LIMIT_ON_STORAGE_ERROR="open")
    admin = admin_key(conveyor)
    limited = conveyor.flask("keys", "create", "limited", "--rate-limit", "2/minute").stdout.strip()

    private_redis.stop()
    started = time.monotonic()
    answers = [get(server, limited) for _ in range(6)]
    assert [answer.status_code for answer in answers] == [200] * 6
    assert all("X-RateLimit-Limit" not in answer.headers for answer in answers)
    assert get(server, WRONG).status_code == 401
    assert health(server) == (200, {"status": "ok",
                                    "rate_limit_storage": {"ok": False, "on_error": "open"}})
    down = storage_metrics(server, admin, let_through=(
        "conveyor_rate_limit_storage_errors_total", {"outcome": "let_through"}, 7))
    assert value(down, "conveyor_rate_limit_storage_up") == 0
    warnings = server.log().count("rate limit storage unreachable")
    assert 1 <= warnings <= 1 + (time.monotonic() - started) // 10  # one per 10 s at most

    private_redis.start()
    wait_for(lambda: health(server)[1]["rate_limit_storage"]["ok"], timeout=10,
             message="/healthz to see Redis again")
    assert limited_statuses(server, limited, 3) == [200, 200, 429]
    assert "Traceback" not in server.log()
