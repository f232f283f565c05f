"""Assertions and probes shared by the fault-injection tests: is a process alive, which
attempt is running where, does the history hold together, does `flask audit` agree."""
import contextlib
import json
import os
from collections import Counter
from urllib.parse import urlparse

import psutil
import psycopg2

from conftest import side_effects, wait_for

# Supervisor settings for tests where no lease may expire: the heartbeats stay as frequent
# as FAST_ENV's, but a loaded machine (or SQLite's one write lock under eight workers) can
# delay them past a 1.5s lease, and a legitimate re-run would then muddle the history.
LONG_LEASE = {"LEASE_S": 15}
# For tests that wait for a lease to expire: short, with a dozen heartbeats of slack.
SHORT_LEASE = {"LEASE_S": 3}


def alive(pid):
    """True while pid runs (a zombie waiting to be reaped has stopped running)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stopped(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def running_attempt(conveyor, job_id, number, timeout=20.0):
    """Wait until attempt `number` of the job is running; return its row."""
    def found():
        for attempt in conveyor.attempts(job_id):
            if attempt.number == number and attempt.status == "running":
                return attempt
        return None
    return wait_for(found, timeout, message=f"attempt {number} of job {job_id} to run")


def attempt_status(conveyor, job_id, number, *statuses, timeout=20.0):
    """Wait until attempt `number` of the job has one of statuses; return its row."""
    def found():
        for attempt in conveyor.attempts(job_id):
            if attempt.number == number and attempt.status in statuses:
                return attempt
        return None
    return wait_for(found, timeout,
                    message=f"attempt {number} of job {job_id} to be {'/'.join(statuses)}")


def effect_seen(path, event, job_id, attempt):
    """Wait until the handler logged `event` for this job and attempt; return the line."""
    def found():
        for line in side_effects(path):
            if line[:3] == [event, str(job_id), str(attempt)]:
                return line
        return None
    return wait_for(found, message=f"{event!r} of job {job_id} attempt {attempt}")


def release(gate, attempt):
    """Let attempt `attempt` of a t.gate job through its gate."""
    with open(f"{gate}.{attempt}", "w"):
        pass


def log_line(supervisor, text, timeout=20.0):
    """Wait until the supervisor's log has a line containing text; return it."""
    def found():
        return next((line for line in supervisor.log().splitlines() if text in line), None)
    return wait_for(found, timeout, message=f"{text!r} in {supervisor.log_path}")


def assert_one_attempt_at_a_time(attempts):
    """Attempts of one job are numbered 1..n and never overlap in time."""
    assert [a.number for a in attempts] == list(range(1, len(attempts) + 1))
    for earlier, later in zip(attempts, attempts[1:]):
        assert earlier.finished_at is not None, f"attempt {earlier.number} never ended"
        assert later.started_at >= earlier.finished_at, (
            f"attempt {later.number} started {earlier.finished_at - later.started_at:.6f}s "
            f"before attempt {earlier.number} ended")


def assert_each_effect_once(path, event="run"):
    """No (job, attempt) logged the same event twice; returns a Counter of events per job."""
    lines = [line for line in side_effects(path) if line[0] == event]
    pairs = Counter((line[1], line[2]) for line in lines)
    repeated = {pair: n for pair, n in pairs.items() if n > 1}
    assert not repeated, f"attempts that logged {event!r} more than once: {repeated}"
    return Counter(int(line[1]) for line in lines)


def cli(*args, check=True):
    """Run a `flask` command in this process through Flask's CLI runner: the same click code
    paths as `conveyor.flask` without its second of start-up. Returns click's Result, whose
    `exception` is SystemExit unless something escaped the command."""
    from app import app
    result = app.test_cli_runner().invoke(args=list(args))
    if check:
        assert result.exit_code == 0, f"flask {' '.join(args)}: {result.stderr}{result.exception!r}"
    return result


def assert_audit_clean(conveyor):
    """The real `flask audit` finds no violation in the stored history."""
    result = conveyor.flask("audit", "--json", check=False)
    assert result.stdout.startswith("{"), f"flask audit failed:\n{result.stdout}{result.stderr}"
    report = json.loads(result.stdout)
    assert report["violations"] == [], report["violations"]
    assert result.returncode == 0, result.stderr
    return report


def gate_path(tmp_path, name="gate"):
    return os.path.join(str(tmp_path), name)


def cut_database_connections(pids, database_url):
    """Terminate the PostgreSQL connections of these processes, as a database restart
    would; returns how many there were. An idle connection cut is replaced before its next
    use: to fail a query, cut it while it waits, inside `jobs_locked`."""
    port = urlparse(database_url).port or 5432
    ports = [c.laddr.port for pid in pids for c in psutil.Process(pid).net_connections("tcp")
             if c.raddr and c.raddr.port == port]
    admin = psycopg2.connect(database_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE client_port = ANY(%s)", (ports,))
            return sum(1 for terminated, in cur.fetchall() if terminated)
    finally:
        admin.close()


@contextlib.contextmanager
def jobs_locked(database_url):
    """Hold an exclusive lock on the jobs table, so that a query reading it waits (and a
    connection cut then fails mid-query); yields how many sessions wait for it."""
    locker = psycopg2.connect(database_url, application_name="test-locker")
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")

            def waiting():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                            "'Lock' AND datname = current_database()")
                return cur.fetchone()[0]
            yield waiting
    finally:
        locker.close()  # the lock ends with the transaction
