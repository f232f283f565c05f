"""The web side of Conveyor for the API tests: the app in this process (Flask's test client,
for the many small requests) and real gunicorn processes (the Procfile's `web`), both on
the test's own database and with real API keys.

Test modules import the fixtures they use from here.
"""
import os
import re
import sys

import pytest
import requests

from conftest import ProcessGroup, wait_for

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


class Api:
    """A fresh app (fresh in-memory rate limits) in this process, on conveyor's database."""

    def __init__(self, conveyor, monkeypatch, env):
        import app as app_module
        from infra import config
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        config.reset()
        self.conveyor = conveyor
        self.app = app_module.create_app()
        self.client = self.app.test_client()

    def key(self, name, role="submit", rate_limit=None):
        """A new key's secret, made through the same core as `flask keys create`."""
        from core import keys
        return keys.create(name, role, rate_limit)[1]

    def call(self, method, path, key=None, headers=None, **kwargs):
        headers = {**(bearer(key) if key else {}), **(headers or {})}
        return self.client.open(path, method=method, headers=headers, **kwargs)

    def refused(self, key, fields, good=None):
        """POST a t.noop job with `fields` alone, then in a batch after a valid one (with
        `good`): both must be 422; their error lists (the batch's numbered by index)."""
        single = self.call("POST", "/v1/jobs", key, json={"type": "t.noop", **fields})
        assert single.status_code == 422, single.get_json()
        batch = self.call("POST", "/v1/jobs/batch", key, json={"jobs": [
            {"type": "t.noop", **(good or {})}, {"type": "t.noop", **fields}]})
        assert batch.status_code == 422, batch.get_json()
        return single.get_json()["errors"], batch.get_json()["errors"]

    def submit(self, key, body, headers=None):
        response = self.call("POST", "/v1/jobs", key, headers=headers, json=body)
        assert response.status_code in (200, 201), response.get_json()
        return response.get_json()


@pytest.fixture
def api(conveyor, monkeypatch):
    """The app on this test's database; call api_with(...) for other settings."""
    return Api(conveyor, monkeypatch, {})


@pytest.fixture
def api_with(conveyor, monkeypatch):
    return lambda **env: Api(conveyor, monkeypatch, env)


class Gunicorn(ProcessGroup):
    """`gunicorn app:app` as the Procfile runs it (gunicorn.conf.py), on a free port, with
    `workers` processes (None: as many as gunicorn.conf.py takes from WEB_CONCURRENCY)."""

    def __init__(self, env, log_path, workers=1, access_log=None):
        args = [sys.executable, "-m", "gunicorn", "app:app", "--bind", "127.0.0.1:0",
                "--no-control-socket"]
        if workers is None:
            workers = int(env["WEB_CONCURRENCY"])
        else:
            args += ["--workers", str(workers)]
        if access_log:
            args += ["--access-logfile", str(access_log), "--access-logformat", "%(p)s %(s)s %(U)s"]
        super().__init__(args, env, log_path)
        self.url = wait_for(self._listening, timeout=30, interval=0.05,
                            message=f"gunicorn to listen (log: {log_path})")
        wait_for(lambda: len(self.worker_pids()) >= workers and self._answers(), timeout=30,
                 interval=0.05, message=f"{workers} gunicorn workers to answer")

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
        match = re.search(r"Listening at: (http://\S+)", self.log())
        return match and match.group(1)

    def _answers(self):
        try:
            return requests.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    def worker_pids(self):
        return self.children()

    def served(self, access_log, path=None):
        """[(worker pid, status)] of the requests in access_log (to `path` when given)."""
        with open(access_log) as f:
            lines = [line.split() for line in f if line.strip()]
        return [(int(pid.strip("<>")), int(status)) for pid, status, url in lines
                if path is None or url == path]

    def stop(self):
        super().stop(grace_s=10)


@pytest.fixture
def gunicorn(conveyor):
    """Start real gunicorn processes on this test's database: gunicorn(workers=2, **env)."""
    servers = []

    def start(workers=1, access_log=None, **env):
        server = Gunicorn({**conveyor.env, **{k: str(v) for k, v in env.items()}},
                          conveyor.tmp_path / f"gunicorn-{len(servers)}.log", workers,
                          access_log)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def admin_key(conveyor, name="admin"):
    """An admin key made as a user makes one: `flask keys create NAME --admin`."""
    return conveyor.flask("keys", "create", name, "--admin").stdout.strip()


@pytest.fixture
def redis_url():
    """The real Redis of TEST_REDIS_URL: skipped loudly when absent, a failure with CI=true."""
    import redis
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        message = f"Redis tests SKIPPED: no Redis at {url} ({exc})"
        if IN_CI:
            pytest.fail(f"CI=true requires Redis. {message}")
        print(f"\n{'!' * 78}\n{message}\n{'!' * 78}", file=sys.stderr)
        pytest.skip(message)
    return url
