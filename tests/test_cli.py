"""The `flask` commands of SPEC §7 as a user runs them: submit prints the id alone, show and
list speak JSON with --json, prune keeps what it must, and bad input is one `Error:` line."""
import json
import re

import pytest

from core import jobs

from core import history
from checks import LONG_LEASE, assert_audit_clean, cli
from conftest import wait_for
from core.errors import NotFound

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_jobs_submit_prints_the_id_alone(conveyor):
    result = conveyor.flask("jobs", "submit", "t.noop", "--payload", '{"n": 1}', "--queue",
                            "billing", "--priority", "-3", "--max-attempts", "7", "--timeout",
                            "12.5", "--delay", "3600", "--idempotency-key", "order-9")

    assert re.fullmatch(r"\d+\n", result.stdout), repr(result.stdout)
    job = conveyor.job(int(result.stdout))
    assert (job.type, job.payload, job.queue, job.priority, job.max_attempts, job.timeout_s,
            job.idempotency_key, job.status) == ("t.noop", {"n": 1}, "billing", -3, 7, 12.5,
                                                 "order-9", "scheduled")
    assert 3590 < job.run_at - job.created_at <= 3600
    second = cli("jobs", "submit", "t.noop")
    assert int(second.stdout) > job.id and second.stdout.strip().isdigit()


def test_jobs_show_json_has_attempts_with_worker_times_and_errors(conveyor):
    job_id = conveyor.submit("t.flaky", {"succeed_on": 2})
    supervisor = conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    conveyor.wait_for_status(job_id, "succeeded")

    shown = json.loads(conveyor.flask("jobs", "show", str(job_id), "--json").stdout)

    assert (shown["id"], shown["status"], shown["attempt"]) == (job_id, "succeeded", 2)
    assert shown["result"] == {"attempt": 2}
    assert shown["last_error"] == "RuntimeError: flaky failure on attempt 1"
    assert shown["backoff"] == {"base_s": 0.05, "max_s": 0.5}
    assert RFC3339_UTC.match(shown["created_at"]) and RFC3339_UTC.match(shown["finished_at"])
    failed, succeeded = shown["attempts"]
    workers = set(supervisor.worker_pids())
    for number, attempt in enumerate(shown["attempts"], 1):
        assert attempt["number"] == number
        assert attempt["worker_id"].startswith("w-") and attempt["host"]
        assert attempt["pid"] in workers
        assert RFC3339_UTC.match(attempt["started_at"])
        assert RFC3339_UTC.match(attempt["finished_at"])
        assert attempt["started_at"] <= attempt["finished_at"]
        assert attempt["duration_ms"] >= 0 and attempt["fenced"] is False
    assert failed["status"] == "failed" and failed["error_type"] == "RuntimeError"
    assert failed["error_message"] == "flaky failure on attempt 1"
    assert "Traceback (most recent call last)" in failed["traceback"]
    assert "RuntimeError: flaky failure on attempt 1" in failed["traceback"]
    assert succeeded["status"] == "succeeded"
    assert succeeded["error_type"] is None and succeeded["traceback"] is None
    text = cli("jobs", "show", str(job_id)).stdout
    assert "attempt 1: failed" in text and "attempt 2: succeeded" in text
    assert "RuntimeError: flaky failure on attempt 1" in text


def test_jobs_list_json_pages_newest_first(conveyor):
    noops = conveyor.submit_many("t.noop", [{"i": i} for i in range(5)])
    other = conveyor.submit("t.fail")

    pages, cursor = [], None
    while True:
        args = ["jobs", "list", "--json", "--type", "t.noop", "--limit", "2"]
        page = json.loads(cli(*args, *(["--cursor", cursor] if cursor else [])).stdout)
        assert set(page) == {"items", "next_cursor"}
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str) and cursor

    assert pages == [noops[4:2:-1], noops[2:0:-1], noops[:1]]
    everything = json.loads(cli("jobs", "list", "--json").stdout)
    assert [item["id"] for item in everything["items"]] == [other, *reversed(noops)]
    assert everything["next_cursor"] is None
    assert everything["items"][0]["type"] == "t.fail" and everything["items"][0]["attempt"] == 0
    by_status = json.loads(cli("jobs", "list", "--json", "--status", "succeeded").stdout)
    assert by_status == {"items": [], "next_cursor": None}


def _age(job_id):
    return jobs.db_time() - history.get_job(job_id).finished_at


def test_prune_in_batches_takes_every_job_however_many_finished_at_once(conveyor):
    """Each batch starts where the last one ended (oldest first): jobs that finished at
    the same instant across a batch's end are all taken, and nothing newer."""
    from models import Job
    ids = conveyor.submit_many("t.noop", [{}] * 9)
    finished = [100.0] * 5 + [200.0, 200.0, 300.0, 10 ** 10]
    for job_id, at in zip(ids, finished):
        Job.update(status="succeeded", finished_at=at).where(Job.id == job_id).execute()
    assert history.prune(3600, batch=2) == 8
    assert [job.id for job in Job.select()] == ids[-1:]


def test_prune_deletes_only_succeeded_and_cancelled_jobs_past_the_cutoff(conveyor):
    succeeded = conveyor.submit("t.noop")
    dead = conveyor.submit("t.fail", max_attempts=1)
    discarded = conveyor.submit("t.fail", max_attempts=1)
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)
    conveyor.wait_until_final([succeeded, dead, discarded])
    cli("dlq", "discard", str(discarded))
    waiting = conveyor.submit("t.noop", delay_s=3600)

    assert cli("prune", "--older-than", "1h").stdout.strip() == "pruned 0 jobs"
    wait_for(lambda: min(_age(succeeded), _age(discarded)) > 1.0, timeout=10,
             message="the finished jobs to be a second old")
    assert cli("prune", "--older-than", "1s").stdout.strip() == "pruned 2 jobs"

    for job_id in (succeeded, discarded):
        with pytest.raises(NotFound):
            conveyor.job(job_id)
        assert conveyor.attempts(job_id) == []
    assert conveyor.job(dead).status == "dead" and len(conveyor.attempts(dead)) == 1
    assert conveyor.job(waiting).status == "scheduled"
    assert_audit_clean(conveyor)


BAD_INPUT = [
    ("jobs", "submit", "no.such"),
    ("jobs", "submit", "t.noop", "--payload", "{not json"),
    ("jobs", "submit", "t.noop", "--payload", "[1, 2]"),
    ("jobs", "submit", "t.noop", "--payload", '{"amount": NaN}'),
    ("jobs", "submit", "t.noop", "--timeout", "nan"),
    ("jobs", "submit", "t.noop", "--delay", "nan"),
    ("jobs", "submit", "t.noop", "--max-attempts", "0"),
    ("jobs", "submit", "t.noop", "--queue", "no spaces allowed"),
    ("jobs", "submit", "t.noop", "--run-at", "tomorrow"),
    ("jobs", "submit", "t.noop", "--run-at", "2030-01-01T00:00:00"),
    ("jobs", "submit", "t.noop", "--delay", "5", "--run-at", "2030-01-01T00:00:00Z"),
    ("jobs", "submit", "t.schema", "--payload", '{"to": 5}'),
    ("jobs", "show", "424242"),
    ("jobs", "show", "not-a-number"),
    ("jobs", "show", "99999999999999999999999"),
    ("jobs", "list", "--status", "lost"),
    ("jobs", "list", "--limit", "501"),
    ("jobs", "list", "--cursor", "forged"),
    ("dlq", "retry", "424242"),
    ("dlq", "discard", "424242"),
    ("prune", "--older-than", "a week"),
]


def test_bad_input_is_one_error_line_without_a_traceback(conveyor):
    for args in BAD_INPUT:
        result = cli(*args, check=False)
        where = " ".join(args)
        assert isinstance(result.exception, SystemExit), f"{where}: {result.exception!r}"
        assert result.exit_code in (1, 2), where
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, f"{where}:\n{result.stderr}"
        assert result.stdout == "", where
    assert history.list_jobs()[0] == [], "a refused submission must store nothing"


@pytest.mark.parametrize("args", [("jobs", "show", "424242"),
                                  ("jobs", "submit", "t.noop", "--timeout", "nan"),
                                  ("jobs", "submit", "t.noop", "--delay", "abc")])
def test_bad_input_in_a_real_process_is_one_error_line(conveyor, args):
    result = conveyor.flask(*args, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, \
        result.stderr
    assert result.stdout == ""


TIME_OPTIONS = [("jobs", "submit", "t.noop", "--delay"), ("jobs", "submit", "t.noop", "--timeout"),
                ("jobs", "wait", "1", "--timeout"), ("prune", "--older-than"),
                ("top", "--once", "--interval")]


def test_every_time_option_reads_plain_seconds_or_units(conveyor):
    for text, seconds in (("90s", 90), ("2m", 120), ("150", 150), ("2.5", 2.5), ("1.5h", 5400)):
        delayed = conveyor.job(int(cli("jobs", "submit", "t.noop", "--delay", text).stdout))
        assert seconds - 5 < delayed.run_at - delayed.created_at <= seconds, text
        limited = conveyor.job(int(cli("jobs", "submit", "t.noop", "--timeout", text).stdout))
        assert limited.timeout_s == seconds, text
        cancelled, _ = jobs.cancel(conveyor.submit("t.noop", delay_s=3600))
        assert cli("jobs", "wait", str(cancelled.id), "--timeout", text,
                   check=False).exit_code == 4, text
        assert cli("prune", "--older-than", text).stdout.startswith("pruned "), text
        assert "workers alive" in cli("top", "--once", "--interval", text).stdout, text
    waiting = conveyor.submit("t.noop", delay_s=3600)
    timed_out = cli("jobs", "wait", str(waiting), "--timeout", "0.01m", check=False)
    assert timed_out.exit_code == 5
    assert timed_out.stderr.splitlines()[-1] == (
        f"Error: job {waiting} is still scheduled after 0.6s")


def test_every_time_option_refuses_a_bad_value_in_one_line(conveyor):
    for *command, option in TIME_OPTIONS:
        for text in ("abc", "-5", "nan", "5 weeks", "2w", ""):
            result = cli(*command, option, text, check=False)
            assert result.exit_code == 1, (command, text)
            assert result.stderr == (f"Error: {option}: {text!r} is not a duration: seconds "
                                     f"(60, 0.5) or 90s, 15m, 12h, 7d\n"), result.stderr
            assert result.stdout == ""
    too_often = cli("top", "--interval", "0.05", check=False)
    assert (too_often.exit_code, too_often.stderr) == (
        1, "Error: --interval: '0.05' is less than 0.1s\n")
    assert history.list_jobs()[0] == [], "a refused submission must store nothing"
