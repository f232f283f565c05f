"""Through a transaction-pooling pgbouncer (SPEC §13): wake-ups come through
LISTEN_DATABASE_URL, each transaction carries the lease bound its session can no longer
have, and a pooler that refuses or drops the session's settings stops the process with one
line. (The guarantee tests and the worker chaos run also run through pgbouncer.)"""
import subprocess
import sys

import psycopg2
import psycopg2.errors
import pytest

from conftest import ROOT, wait_for

pytestmark = [pytest.mark.postgres,
              pytest.mark.parametrize("database_url", ["pgbouncer"], indirect=True)]


def _listening(conveyor):
    """The server's LISTEN sessions on this database (only a direct connection keeps one)."""
    direct = psycopg2.connect(conveyor.database_url.direct)
    try:
        with direct.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND query LIKE 'LISTEN %%'")
            return cursor.fetchone()[0]
    finally:
        direct.close()


def test_an_announced_job_starts_at_once_through_listen_database_url(conveyor):
    # Workers poll only every 30 s: a job started within seconds was woken by a NOTIFY,
    # which a LISTEN through the pooler would never get (its server session moves on).
    supervisor = conveyor.start_supervisor(concurrency=2, POLL_INTERVAL_S="30")
    supervisor.wait_for_workers(2)
    wait_for(lambda: _listening(conveyor), timeout=10, message="the supervisor to LISTEN")
    for n in range(3):
        job_id = conveyor.submit("t.noop", {"n": n})
        conveyor.wait_for_status(job_id, "succeeded", timeout=5)
    assert "prepared statements" not in supervisor.log()  # no failed EXECUTE to find out


def _lock_free(direct, job_id):
    """Whether the job's row can be updated now (waiting at most 50 ms for its lock)."""
    with direct.cursor() as cursor:
        try:
            cursor.execute("SET lock_timeout = '50ms'")
            cursor.execute("UPDATE jobs SET priority = priority WHERE id = %s", (job_id,))
            direct.commit()
            return True
        except psycopg2.errors.LockNotAvailable:
            direct.rollback()
            return False


def test_a_transaction_left_idle_through_the_pooler_ends_with_the_lease(conveyor):
    """A session cut off or stalled inside a transaction would keep its row locks (and the
    reaper from its job) for good: its transaction bounds its own idleness to the lease,
    as a direct connection's session does."""
    import models
    job_id = conveyor.submit("t.noop")
    direct = psycopg2.connect(conveyor.database_url.direct)
    lease_ms = f"{round(conveyor.settings.lease_s * 1000)}ms"
    try:
        with pytest.raises(models.DB_ERRORS):
            with models.db.atomic():
                timeout = models.db.execute_sql(
                    "SELECT current_setting('idle_in_transaction_session_timeout')").fetchone()
                assert timeout == (lease_ms,)
                models.db.execute_sql("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                assert not _lock_free(direct, job_id)
                wait_for(lambda: _lock_free(direct, job_id), timeout=10,
                         message="the idle transaction's lock to be released")
                models.db.execute_sql("SELECT 1")  # its session is gone, and with it the work
    finally:
        direct.close()
        models.reset_connection()
    assert conveyor.job(job_id).status == "available"


@pytest.mark.parametrize("pooler_drops", [False, True], ids=["refuses-options", "drops-options"])
def test_a_pooler_without_database_pool_mode_stops_the_process_with_one_line(
        conveyor, pooler_drops):
    from pgbouncer import Pgbouncer
    bouncer = Pgbouncer(conveyor.database_url.direct, pool_size=2,
                        ignore_startup_parameters=("extra_float_digits", "options")) \
        if pooler_drops else None
    env = {**conveyor.env, "DATABASE_POOL_MODE": "session"}
    if bouncer:
        env["DATABASE_URL"] = bouncer.url(conveyor.database_url.direct)
    try:
        result = subprocess.run([sys.executable, "-m", "flask", "jobs", "list"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
    finally:
        if bouncer:
            bouncer.stop()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATABASE_POOL_MODE=transaction" in lines[0]
    assert ("idle_in_transaction_session_timeout" if pooler_drops
            else "unsupported startup parameter") in lines[0]
