"""Fixtures: a real database per test (SQLite, and PostgreSQL when one is available) and
real supervisor processes.

PostgreSQL comes from TEST_DATABASE_URL, else from testcontainers when Docker works;
otherwise only SQLite runs and the run says so loudly. With CI=true a run without
PostgreSQL fails instead.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from urllib.parse import urlparse, urlunparse

import psutil
import psycopg2
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_HANDLERS = os.path.join(ROOT, "tests", "handlers")
sys.path.insert(0, ROOT)

# Small timings keep the suite fast; LEASE_S stays above 2 x HEARTBEAT_S as required.
FAST_ENV = {
    "HEARTBEAT_S": "0.2",
    "LEASE_S": "1.5",
    "POLL_INTERVAL_S": "0.05",
    "SHUTDOWN_GRACE_S": "5",
    "BACKOFF_BASE_S": "0.05",
    "BACKOFF_MAX_S": "0.5",
    "HANDLER_PATHS": TEST_HANDLERS,
    "LOG_LEVEL": "info",
}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg = {"url": None, "reason": None, "container": None}


def _find_postgres():
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url, None
    try:
        from testcontainers.postgres import PostgresContainer
        container = PostgresContainer("postgres:15-alpine", driver=None)
        container.start()
        _pg["container"] = container
        return container.get_connection_url(), None
    except Exception as exc:  # no Docker here: say so, below
        return None, f"TEST_DATABASE_URL is not set and testcontainers failed: {exc}"


def pytest_configure(config):
    _pg["url"], _pg["reason"] = _find_postgres()
    if _pg["url"] is None:
        message = f"PostgreSQL tests SKIPPED: {_pg['reason']}"
        if IN_CI:
            pytest.exit(f"CI=true requires PostgreSQL. {message}", returncode=1)
        warnings.warn(message)
        print(f"\n{'!' * 78}\n{message}\n{'!' * 78}", file=sys.stderr)


def pytest_unconfigure(config):
    if _pg["container"] is not None:
        _pg["container"].stop()


def pytest_terminal_summary(terminalreporter):
    if _pg["url"] is None:
        terminalreporter.write_sep("!", f"PostgreSQL tests SKIPPED: {_pg['reason']}", red=True)


def _with_database(url, name):
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{name}"))


def create_pg_database(name):
    """A new, empty PostgreSQL database; returns its URL."""
    admin = psycopg2.connect(_pg["url"])
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return _with_database(_pg["url"], name)


def drop_pg_database(name):
    admin = psycopg2.connect(_pg["url"])
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def pg_session_url(worker_id, testrun_uid):
    """One PostgreSQL database per xdist worker, emptied before each test; named for this
    run too, so two runs against one server never drop each other's databases."""
    if _pg["url"] is None:
        pytest.skip(f"PostgreSQL unavailable: {_pg['reason']}")
    name = f"conveyor_test_{worker_id}_{testrun_uid[:8]}"
    url = create_pg_database(name)
    yield url
    drop_pg_database(name)


def _empty_pg(url):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename <> 'schema_migration'")
        tables = [row[0] for row in cur.fetchall()]
        if tables:
            cur.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    conn.close()


@pytest.fixture(scope="session")
def pgbouncer(pg_session_url):
    """This xdist worker's pgbouncer in transaction-pooling mode (tests/pgbouncer.py), in
    front of the test server; started on first use."""
    from pgbouncer import Pgbouncer, PgbouncerUnavailable
    try:
        bouncer = Pgbouncer(pg_session_url)
    except PgbouncerUnavailable as exc:
        if IN_CI:
            raise
        pytest.skip(f"pgbouncer unavailable: {exc}")
    yield bouncer
    bouncer.stop()


class PooledURL(str):
    """A database URL through a transaction pooler; .direct is the database itself."""

    def __new__(cls, url, direct):
        instance = super().__new__(cls, url)
        instance.direct = direct
        return instance


def pooled_env(database_url):
    """What a Conveyor behind the pooler of database_url is told (README, docs/scaling.md):
    nothing when database_url is the database itself."""
    if not isinstance(database_url, PooledURL):
        return {}
    return {"DATABASE_POOL_MODE": "transaction", "LISTEN_DATABASE_URL": database_url.direct}


# The databases every test of a guarantee runs on: the `database_url` fixture's own two,
# and PostgreSQL through a transaction-pooling pgbouncer (SPEC §13). Use as
# pytest.mark.parametrize("database_url", WITH_PGBOUNCER, indirect=True).
WITH_PGBOUNCER = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                  pytest.param("pgbouncer", marks=pytest.mark.postgres)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """The URL of an empty database: a SQLite file, or a truncated PostgreSQL database
    (directly, or through pgbouncer where a test asks for WITH_PGBOUNCER)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/conveyor.db"
    url = request.getfixturevalue("pg_session_url")
    _empty_pg(url)
    if request.param == "pgbouncer":
        return PooledURL(request.getfixturevalue("pgbouncer").url(url), url)
    return url


@pytest.fixture
def postgres_url(request):
    """For PostgreSQL-only tests."""
    url = request.getfixturevalue("pg_session_url")
    _empty_pg(url)
    return url


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scenario_unavailable(message):
    """A fault scenario that cannot run here (no private server, no namespaces): a skip
    said loudly, and a failure under CI=true, which requires every scenario to run."""
    if IN_CI:
        pytest.fail(f"CI=true requires it. {message}")
    print(f"\n{'!' * 78}\n{message}\n{'!' * 78}", file=sys.stderr)
    pytest.skip(message)


def in_threads(function, arguments, timeout=60.0):
    """Run function(*args) for each args of arguments, each in a thread of its own, all at
    once; return when all have ended (or timeout seconds have passed for each)."""
    threads = [threading.Thread(target=function, args=args) for args in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def wait_for(condition, timeout=15.0, interval=0.02, message="condition"):
    """Poll condition until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class ProcessGroup:
    """A real process in its own process group, so it and all it forks can be killed at
    once (a "host"); its output goes to a log file."""

    def __init__(self, args, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def children(self):
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum):
        os.kill(self.pid, signum)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill_group(self):
        """kill -9 the process and everything it forked (orphans included)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)

    def stop(self, grace_s=0.0):
        """SIGTERM and up to grace_s to exit, then kill -9 whatever of the group is left."""
        if grace_s and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        self._log.close()


class SupervisorProcess(ProcessGroup):
    """A real `python -m supervisor`; `on`, when given, runs it elsewhere: the command that
    runs a command there and execs it (tests/faults/hosts.py Host.command)."""

    def __init__(self, env, log_path, concurrency=2, queues=None, on=None):
        args = [sys.executable, "-m", "supervisor", "--concurrency", str(concurrency)]
        if queues:
            args += ["--queues", queues]
        super().__init__(on(args) if on else args, env, log_path)

    def worker_pids(self):
        """The supervisor's forked workers: children running its own command line (not a
        helper such as the `file` that croniter's import runs through `platform`)."""
        try:
            supervisor = psutil.Process(self.pid)
            command = supervisor.cmdline()
            children = supervisor.children()
        except psutil.Error:
            return []
        pids = []
        for child in children:
            try:
                if child.cmdline() == command:
                    pids.append(child.pid)
            except psutil.Error:  # gone meanwhile
                pass
        return pids

    def wait_for_workers(self, count, timeout=20.0):
        """The pids of at least `count` workers, once each has registered in the database:
        a helper child is forked with the supervisor's command line too, until it execs."""
        from models import Worker

        def registered():
            pids = self.worker_pids()
            if len(pids) < count:
                return None
            known = {w.pid for w in Worker.select(Worker.pid).where(Worker.pid.in_(pids))}
            ready = [pid for pid in pids if pid in known]
            return len(ready) >= count and ready

        return wait_for(registered, timeout, message=f"{count} workers of supervisor {self.pid}")

    def kill_host(self):
        """kill -9 the supervisor and every worker it forked, at once."""
        self.kill_group()

    def wait(self, timeout=30.0):
        return self.proc.wait(timeout)


def rules():
    """The submission rules of the settings in force (a Conveyor fixture sets them)."""
    from core.submission import Rules
    from infra.config import settings
    return Rules.from_settings(settings())


class Conveyor:
    """One test's Conveyor: its environment, its database, its supervisors."""

    def __init__(self, database_url, tmp_path, monkeypatch):
        from infra import boot
        from infra import config
        from infra import metrics
        self.tmp_path = tmp_path
        self.database_url = database_url
        given = {**FAST_ENV, "DATABASE_URL": str(database_url), **pooled_env(database_url)}
        self.env = {**os.environ, **given, "PYTHONUNBUFFERED": "1"}
        for name, value in given.items():
            monkeypatch.setenv(name, value)
        config.reset()
        self.settings = boot.start()
        metrics.reset()  # counts of earlier tests in this process belong to their databases
        self.supervisors = []

    @property
    def is_postgres(self):
        return not self.database_url.startswith("sqlite")

    def submit(self, type, payload=None, **fields):
        """Enqueue one job through the core, as the API would; returns its id."""
        from core import jobs, submission
        body = {"type": type, "payload": payload or {}, **fields}
        [(job, _)] = jobs.enqueue([submission.validate_submission(body, rules())])
        return job.id

    def submit_many(self, type, payloads, **fields):
        from core import jobs, submission
        new = [submission.validate_submission({"type": type, "payload": p, **fields}, rules())
               for p in payloads]
        return [job.id for job, _ in jobs.enqueue(new)]

    def job(self, job_id):
        from core import history
        return history.get_job(job_id)

    def attempts(self, job_id):
        from core import history
        return history.attempts_of(job_id)

    def statuses(self, job_ids):
        from models import Job
        return {row.id: row.status for row in Job.select(Job.id, Job.status)
                .where(Job.id.in_(list(job_ids)))}

    def wait_for_status(self, job_id, *statuses, timeout=20.0):
        return wait_for(lambda: self.job(job_id).status in statuses and self.job(job_id),
                        timeout, message=f"job {job_id} to be {'/'.join(statuses)}")

    def wait_until_final(self, job_ids, timeout=60.0):
        from core.status import FINAL
        ids = list(job_ids)

        def all_final():
            return all(s in FINAL for s in self.statuses(ids).values())
        return wait_for(all_final, timeout, interval=0.1, message=f"{len(ids)} jobs to finish")

    def start_supervisor(self, concurrency=2, queues=None, on=None, **env):
        supervisor = SupervisorProcess(
            {**self.env, **{k: str(v) for k, v in env.items()}},
            self.tmp_path / f"supervisor-{len(self.supervisors)}.log", concurrency, queues, on)
        self.supervisors.append(supervisor)
        return supervisor

    def flask(self, *args, env=None, check=True, input=None):
        """Run a `flask` command as a user would; returns the CompletedProcess."""
        result = subprocess.run([sys.executable, "-m", "flask", *args], cwd=ROOT,
                                env={**self.env, **(env or {})}, capture_output=True,
                                text=True, timeout=60, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"flask {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def close(self):
        for supervisor in self.supervisors:
            supervisor.stop()
        import models
        models.reset_connection()


@pytest.fixture
def conveyor(database_url, tmp_path, monkeypatch):
    instance = Conveyor(database_url, tmp_path, monkeypatch)
    yield instance
    instance.close()


@pytest.fixture
def pg_conveyor(postgres_url, tmp_path, monkeypatch):
    instance = Conveyor(postgres_url, tmp_path, monkeypatch)
    yield instance
    instance.close()


def side_effects(path):
    """Lines a test handler appended to its side-effect log, split into fields."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


@pytest.fixture
def effects_log(tmp_path):
    return str(tmp_path / f"effects-{uuid.uuid4().hex[:6]}.log")

