"""DATABASE_URL in libpq's forms beyond one host (SPEC §13): a URL of several hosts and the
key=value string. libpq tries the hosts in turn at every connection, so web, workers, the
supervisor's LISTEN connection and the `flask` commands all reach the host that answers.
(tests/faults/test_faults_failover.py: a standby and a primary, target_session_attrs.)"""
import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest

from conftest import FAST_ENV, ROOT, Conveyor, free_port

# Announced jobs only: an idle worker polls twice a minute, so a job started within
# seconds was woken through the supervisor's LISTEN connection.
SLOW_POLL = {"POLL_INTERVAL_S": 30}


def several_hosts(url, down_port):
    """url with a host that refuses connections listed first."""
    parts = urlparse(url)
    return (f"postgresql://{parts.username}@127.0.0.1:{down_port},{parts.hostname}:"
            f"{parts.port or 5432}{parts.path}?target_session_attrs=read-write")


def key_value(url, down_port):
    parts = urlparse(url)
    return (f"host=127.0.0.1,{parts.hostname} port={down_port},{parts.port or 5432} "
            f"user={parts.username} dbname={parts.path[1:]} target_session_attrs=read-write")


@pytest.mark.postgres
@pytest.mark.parametrize("form", [several_hosts, key_value])
def test_every_process_reaches_the_host_that_answers(postgres_url, tmp_path, monkeypatch, form):
    down = free_port()
    conveyor = Conveyor(form(postgres_url, down), tmp_path, monkeypatch)
    try:
        supervisor = conveyor.start_supervisor(concurrency=1, **SLOW_POLL)
        supervisor.wait_for_workers(1)
        job_id = conveyor.flask("jobs", "submit", "t.noop").stdout.strip()
        conveyor.flask("jobs", "wait", job_id, "--timeout", "10")
        assert json.loads(conveyor.flask("jobs", "show", job_id, "--json").stdout)[
            "status"] == "succeeded"
        started = supervisor.log()
        assert "cannot listen" not in started, started
        port = urlparse(postgres_url).port or 5432
        assert f"127.0.0.1:{down},127.0.0.1:{port}/" in started, started  # what it uses
    finally:
        conveyor.close()


def test_a_database_url_libpq_cannot_read_is_one_line_naming_it():
    from infra import config
    for url, reason in [("postgresql://a:5432,b:5432/", "names no database"),
                        ("postgresql://a:5432,b:5432/x?target_session=rw", "target_session"),
                        ("host=a,b port=1,2 user=x", "names no database"),
                        ("host=a dbname='x", "libpq")]:
        with pytest.raises(config.ConfigError, match="DATABASE_URL") as refused:
            config.Settings.from_env({"DATABASE_URL": url})
        assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_a_database_that_no_host_answers_for_is_one_line_naming_every_host(tmp_path):
    down = [free_port(), free_port()]
    url = f"postgresql://postgres@127.0.0.1:{down[0]},127.0.0.1:{down[1]}/x"
    result = subprocess.run([sys.executable, "-m", "flask", "jobs", "list"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **FAST_ENV, "DATABASE_URL": url})
    assert result.returncode == 2 and result.stdout == "", result
    [line] = result.stderr.splitlines()
    assert f"127.0.0.1:{down[0]},127.0.0.1:{down[1]}/x" in line, line  # where it looked
    assert all(f'port {port} failed: Connection refused' in line for port in down), line
