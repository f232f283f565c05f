"""The operator's commands as a user runs them, as real `flask` processes against a real
supervisor: `flask jobs wait` follows a job to its end and says how it ended in its exit
status, and `flask top` shows the queues and what every worker is running."""
import json
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from core import jobs

from core import status as statuses

from core import workers as registry
from checks import (LONG_LEASE, cut_database_connections, gate_path, jobs_locked, release,
                    running_attempt)
from conftest import ProcessGroup, wait_for

LONG_LEASE_ENV = {name: str(value) for name, value in LONG_LEASE.items()}


def flask_process(conveyor, name, *args, sigint_ignored=False):
    """A `flask` command left running, its stdout and stderr in one log; sigint_ignored
    starts it with SIGINT ignored, as a script's background job (`cmd &`) or some CI runners
    are."""
    command = [sys.executable, "-m", "flask", *args]
    if sigint_ignored:  # the disposition is inherited through exec, as from such a parent
        command = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
                   "signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])", *command]
    return ProcessGroup(command, conveyor.env, conveyor.tmp_path / f"{name}.log")


def logged(process, text):
    return wait_for(lambda: text in process.log(), message=f"{text!r} in {process.log_path}")


def test_jobs_wait_shows_each_status_and_attempt_then_exits_0_on_success(conveyor, tmp_path):
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.gate", {"gate": gate, "hold": [1, 2], "succeed_on": 2})
    waiting = flask_process(conveyor, "wait", "jobs", "wait", str(job_id), "--timeout", "60")
    try:
        logged(waiting, f"job {job_id} available")
        conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
        for attempt in (1, 2):
            running_attempt(conveyor, job_id, attempt)
            logged(waiting, f"job {job_id} running, attempt {attempt}")
            release(gate, attempt)

        assert waiting.proc.wait(30) == 0
    finally:
        waiting.stop()
    lines = waiting.log().splitlines()
    assert lines[-1] == f"job {job_id} succeeded, attempt 2"
    progress = re.findall(r"(?m)^ *\d+\.\ds  (job .*)$", waiting.log())
    assert progress[0] == f"job {job_id} available"
    assert progress[-1] == f"job {job_id} succeeded, attempt 2"
    assert progress.index(f"job {job_id} running, attempt 1") < progress.index(
        f"job {job_id} running, attempt 2")
    failed = "attempt 1: RuntimeError: gate failure on attempt 1"
    assert set(progress) <= {f"job {job_id} {state}" for state in (
        "available", "running, attempt 1", f"retryable, {failed}", f"available, {failed}",
        "running, attempt 2", "succeeded, attempt 2")}

    shown = conveyor.flask("jobs", "wait", str(job_id), "--json")
    document = json.loads(shown.stdout)  # the final job alone on stdout, progress on stderr
    assert (document["id"], document["status"], document["result"]["attempt"]) == (
        job_id, "succeeded", 2)
    assert [a["status"] for a in document["attempts"]] == ["failed", "succeeded"]
    assert f"job {job_id} succeeded, attempt 2" in shown.stderr


def test_jobs_wait_keeps_waiting_through_a_database_restart(pg_conveyor):
    job_id = pg_conveyor.submit("t.noop", delay_s=3600)
    waiting = flask_process(pg_conveyor, "wait", "jobs", "wait", str(job_id))
    try:
        logged(waiting, f"job {job_id} scheduled")
        with jobs_locked(pg_conveyor.database_url) as waiting_sessions:
            wait_for(lambda: waiting_sessions() == 1, message="the wait's poll to wait mid-query")
            assert cut_database_connections([waiting.pid], pg_conveyor.database_url) == 1
        logged(waiting, "database unavailable, still waiting")
        jobs.cancel(job_id)

        assert waiting.proc.wait(10) == 4
    finally:
        waiting.stop()
    assert waiting.log().splitlines()[-1] == f"job {job_id} cancelled"
    assert "Traceback" not in waiting.log()


def test_jobs_wait_exit_status_tells_dead_cancelled_timed_out_and_unknown_apart(conveyor):
    dead = conveyor.submit("t.permanent", {"message": "card declined"})
    cancelled = conveyor.submit("t.noop", delay_s=3600)
    jobs.cancel(cancelled)
    waiting = conveyor.submit("t.noop", delay_s=3600)
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)

    commands = [("jobs", "wait", str(dead), "--timeout", "30"),
                ("jobs", "wait", str(cancelled)),
                ("jobs", "wait", str(waiting), "--timeout", "0.5", "--json"),
                ("jobs", "wait", "424242")]
    with ThreadPoolExecutor(len(commands)) as pool:
        on_dead, on_cancelled, on_timeout, on_unknown = pool.map(
            lambda args: conveyor.flask(*args, check=False), commands)

    assert on_dead.returncode == 3, on_dead.stderr
    assert on_dead.stdout == f"job {dead} dead, attempt 1: Permanent: card declined\n"
    assert on_cancelled.returncode == 4, on_cancelled.stderr
    assert on_cancelled.stdout == f"job {cancelled} cancelled\n"
    assert on_timeout.returncode == 5, on_timeout.stderr
    assert json.loads(on_timeout.stdout)["status"] == "scheduled"
    assert on_timeout.stderr.splitlines()[-1] == (
        f"Error: job {waiting} is still scheduled after 0.5s")
    assert on_unknown.returncode == 1
    assert on_unknown.stderr.splitlines()[-1] == "Error: job 424242 not found"


def frame_tables(frame):
    """The queue table of a `flask top` frame as {queue: {status: count}}, and its worker
    lines."""
    queue_part, worker_part = frame.split("\n\n")[1:3]
    header, *rows = queue_part.splitlines()
    statuses = header.split()[1:]
    queues = {row.split()[0]: dict(zip(statuses, map(int, row.split()[1:]))) for row in rows}
    return queues, worker_part.splitlines()[1:]


def test_top_once_shows_queues_by_status_and_what_each_worker_runs(conveyor, tmp_path):
    gate = gate_path(tmp_path)
    busy = conveyor.submit("t.gate", {"gate": gate})
    conveyor.submit_many("t.noop", [{}, {}], queue="emails", delay_s=3600)
    conveyor.submit("t.noop", queue="reports")  # no worker takes this queue
    supervisor = conveyor.start_supervisor(concurrency=2, queues="default", **LONG_LEASE)
    attempt = running_attempt(conveyor, busy, 1)
    wait_for(lambda: len(registry.live_workers(15)) == 2, message="both workers registered")

    with ThreadPoolExecutor(2) as pool:  # a lease as long as the supervisor's, as in production
        once, as_json = pool.map(lambda args: conveyor.flask(*args, env=LONG_LEASE_ENV),
                                 [("top", "--once"), ("top", "--json")])
    release(gate, 1)

    frame = once.stdout
    assert "workers alive: 2" in frame.splitlines()[0]
    queues, workers = frame_tables(frame)
    assert {queue: {s: n for s, n in counts.items() if n} for queue, counts in queues.items()} == {
        "default": {"running": 1}, "emails": {"scheduled": 2}, "reports": {"available": 1},
        "(all)": {"running": 1, "scheduled": 2, "available": 1}}
    assert list(queues["default"]) == list(statuses.STATUSES)
    [busy_line] = [line for line in workers if line.split()[1] == str(attempt.pid)]
    assert busy_line.split()[0] == attempt.host[:20] and busy_line.split()[2] == "default"
    assert f"{busy} t.gate attempt 1" in busy_line
    [idle_line] = [line for line in workers if line != busy_line]
    assert idle_line.endswith("idle") and int(idle_line.split()[1]) in supervisor.worker_pids()

    document = json.loads(as_json.stdout)
    assert document["stats"]["totals"] == {"running": 1, "scheduled": 2, "available": 1}
    assert document["stats"]["oldest_available_age_s"] > 0
    assert sorted(w["pid"] for w in document["workers"]) == sorted(supervisor.worker_pids())


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-ignored"])
def test_top_refreshes_every_interval_until_interrupted(conveyor, sigint_ignored):
    conveyor.submit("t.noop")
    top = flask_process(conveyor, "top", "top", "--interval", "0.2", sigint_ignored=sigint_ignored)
    try:
        wait_for(lambda: top.log().count("workers alive: 0") >= 3, message="three frames")
        conveyor.submit("t.noop", queue="later")
        logged(top, "\nlater ")  # a new queue shows up in a later frame
        top.signal(signal.SIGINT)
        assert top.proc.wait(10) == 0
    finally:
        top.stop()
    assert "Traceback" not in top.log() and "Aborted" not in top.log()
