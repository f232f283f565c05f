"""The retry policy of SPEC §5 end to end, through real workers and a real database:
exponential backoff with full jitter, dead-lettering after max_attempts and back out of the
DLQ, Permanent, RetryAfter, results that are not JSON, and ctx.step running its side effect
once per job however many attempts it takes. The policy's decisions alone are unit-tested
in test_policy.py."""
import json

import pytest

from core import jobs

from core import history

from core import submission

from core import workers
from checks import LONG_LEASE, assert_audit_clean, cli, gate_path, release, running_attempt
from conftest import side_effects, wait_for, rules
from core.errors import Invalid, LeaseLost


def _cap(n, base_s, max_s):
    return min(max_s, base_s * 2 ** (n - 1))


# ---------------------------------------------------------------------------- end to end

def test_retry_delays_follow_backoff_with_full_jitter(conveyor, effects_log, tmp_path,
                                                     monkeypatch):
    from infra import config
    base_s, max_s = 0.2, 0.5
    monkeypatch.setenv("BACKOFF_BASE_S", str(base_s))
    monkeypatch.setenv("BACKOFF_MAX_S", str(max_s))
    config.reset()
    gates = [gate_path(tmp_path, f"gate-{i}") for i in range(3)]
    ids = [conveyor.submit("t.gate", {"gate": gate, "hold": [2, 3, 4, 5], "succeed_on": 5,
                                      "log": effects_log}, max_attempts=5) for gate in gates]
    for job_id in ids:
        job = conveyor.job(job_id)
        assert (job.backoff_base_s, job.backoff_max_s) == (base_s, max_s)
    conveyor.start_supervisor(concurrency=3, **LONG_LEASE)

    delays = []
    for n in range(1, 5):
        for job_id, gate in zip(ids, gates):
            # Attempt n failed and attempt n+1 is held: the job's run_at still says when the
            # retry was due (a claim does not move it).
            nxt = running_attempt(conveyor, job_id, n + 1)
            failed = conveyor.attempts(job_id)[n - 1]
            assert failed.status == "failed" and failed.error_type == "RuntimeError"
            due = conveyor.job(job_id).run_at
            # finished_at is read from the clock a statement after run_at: a hair later.
            delay = due - failed.finished_at
            assert -0.05 <= delay <= _cap(n, base_s, max_s) + 0.01, (job_id, n, delay)
            assert nxt.started_at >= due - 0.01, "a retry ran before it was due"
            delays.append(delay)
            release(gate, n + 1)
    for job_id in ids:
        job = conveyor.wait_for_status(job_id, "succeeded")
        assert job.result["attempt"] == 5
        assert [a.status for a in conveyor.attempts(job_id)] == ["failed"] * 4 + ["succeeded"]
    # Full jitter: the delays spread out below their caps instead of sitting on them.
    caps = [_cap(n, base_s, max_s) for n in range(1, 5) for _ in ids]
    assert any(d < 0.8 * cap for d, cap in zip(delays, caps)), delays
    assert len({round(d, 3) for d in delays}) > 6, delays
    assert_audit_clean(conveyor)


def test_job_is_dead_lettered_after_max_attempts_and_retried_from_the_dlq(conveyor,
                                                                         effects_log):
    job_id = conveyor.submit("t.flaky", {"succeed_on": 6, "log": effects_log}, max_attempts=3)
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)

    job = conveyor.wait_for_status(job_id, "dead")
    assert job.dead_reason == "max_attempts" and job.attempt == 3
    assert job.last_error == "RuntimeError: flaky failure on attempt 3"
    attempts = conveyor.attempts(job_id)
    assert [a.status for a in attempts] == ["failed"] * 3
    assert all("RuntimeError" in a.traceback for a in attempts)
    dlq = json.loads(cli("dlq", "list", "--json").stdout)
    [listed] = [item for item in dlq["items"] if item["id"] == job_id]
    assert listed["status"] == "dead" and listed["dead_reason"] == "max_attempts"
    assert listed["last_error"] == job.last_error

    cli("dlq", "retry", str(job_id))
    # A fresh budget of 3: attempts 4 and 5 fail, attempt 6 succeeds.
    job = conveyor.wait_for_status(job_id, "succeeded", "dead")
    assert job.status == "succeeded" and job.result == {"attempt": 6}
    assert [a.status for a in conveyor.attempts(job_id)] == ["failed"] * 5 + ["succeeded"]
    assert [line[2] for line in side_effects(effects_log)] == [str(n) for n in range(1, 7)]
    assert job_id not in [i["id"] for i in json.loads(
        cli("dlq", "list", "--json").stdout)["items"]]
    again = cli("dlq", "retry", str(job_id), check=False)
    assert again.exit_code == 1 and again.stderr.startswith("Error:")
    assert "succeeded" in again.stderr
    assert_audit_clean(conveyor)


def test_discarded_dead_job_is_cancelled_with_its_history(conveyor, effects_log):
    job_id = conveyor.submit("t.fail", {"log": effects_log}, max_attempts=2)
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    conveyor.wait_for_status(job_id, "dead")

    cli("dlq", "discard", str(job_id))

    job = conveyor.job(job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert [a.status for a in conveyor.attempts(job_id)] == ["failed", "failed"]
    assert json.loads(cli("dlq", "list", "--json").stdout)["items"] == []
    for command in ("retry", "discard"):
        refused = cli("dlq", command, str(job_id), check=False)
        assert refused.exit_code == 1
        assert refused.stderr.strip() == f"Error: job {job_id} is cancelled, not in the " \
                                          f"dead-letter queue"
    assert conveyor.job(job_id).status == "cancelled"
    assert_audit_clean(conveyor)


def test_permanent_failure_goes_straight_to_dead(conveyor, effects_log):
    job_id = conveyor.submit("t.permanent", {"log": effects_log}, max_attempts=5)
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)

    job = conveyor.wait_for_status(job_id, "dead")

    assert job.dead_reason == "permanent" and job.attempt == 1
    assert job.last_error == "Permanent: card declined"
    [attempt] = conveyor.attempts(job_id)
    assert attempt.status == "failed" and attempt.error_type == "Permanent"
    assert len(side_effects(effects_log)) == 1
    assert_audit_clean(conveyor)


def test_retry_after_sets_the_next_run_and_counts_as_an_attempt(conveyor, effects_log):
    later = conveyor.submit("t.retry_after", {"s": 1.2, "succeed_on": 2, "log": effects_log},
                            max_attempts=3)
    last_try = conveyor.submit("t.retry_after", {"s": 1.2, "succeed_on": 2}, max_attempts=1)
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)

    job = conveyor.wait_for_status(later, "succeeded")
    first, second = conveyor.attempts(later)
    assert first.status == "failed" and first.error_type == "RetryAfter"
    # run_at is left as the retry set it: the end of attempt 1 plus the requested 1.2s,
    # well above the backoff cap of 0.5s the job would otherwise get.
    assert 1.15 <= job.run_at - first.finished_at <= 1.21
    assert second.started_at >= job.run_at - 0.01
    assert job.result == {"attempt": 2}
    dead = conveyor.wait_for_status(last_try, "dead")
    assert dead.dead_reason == "max_attempts" and dead.attempt == 1
    assert "RetryAfter" in dead.last_error
    assert_audit_clean(conveyor)


def test_result_that_is_not_json_fails_the_attempt(conveyor):
    job_id = conveyor.submit("t.bad_result", max_attempts=2)
    conveyor.start_supervisor(concurrency=1, **LONG_LEASE)

    job = conveyor.wait_for_status(job_id, "dead")

    assert job.result is None and job.dead_reason == "max_attempts"
    attempts = conveyor.attempts(job_id)
    assert [a.status for a in attempts] == ["failed", "failed"]
    for attempt in attempts:
        assert attempt.error_type == "ResultNotJSON"
        assert "not JSON-serialisable" in attempt.error_message
        assert "object" in attempt.error_message
    assert_audit_clean(conveyor)


def test_unknown_job_type_is_refused(conveyor):
    with pytest.raises(Invalid, match="unknown job type 'no.such'"):
        submission.validate_submission({"type": "no.such", "payload": {}}, rules())
    refused = cli("jobs", "submit", "no.such", "--payload", "{}", check=False)
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: unknown job type 'no.such' (type: 'no.such' is not registered)"]
    assert refused.stdout == ""
    assert history.list_jobs()[0] == []


# ---------------------------------------------------------------------------- steps

def test_step_runs_once_per_job_across_attempts(conveyor, effects_log):
    job_id = conveyor.submit("t.step", {"succeed_on": 3, "log": effects_log}, max_attempts=3)
    conveyor.start_supervisor(concurrency=2, **LONG_LEASE)

    job = conveyor.wait_for_status(job_id, "succeeded")

    events = [line[:3] for line in side_effects(effects_log)]
    assert [e for e in events if e[0] == "charge"] == [["charge", str(job_id), "1"]]
    assert [e for e in events if e[0] == "run"] == [
        ["run", str(job_id), str(n)] for n in (1, 2, 3)]
    assert job.result == {"charged": 1}  # later attempts got attempt 1's stored result
    assert [a.status for a in conveyor.attempts(job_id)] == ["failed", "failed", "succeeded"]
    assert_audit_clean(conveyor)


def _worker(name):
    return workers.WorkerInfo(id=f"w-{name}", supervisor_id="s-test", host="test", pid=0)


def test_step_write_without_the_lease_is_refused(conveyor):
    from supervisor.worker import run_step
    job_id = conveyor.submit("t.noop")
    [stale] = jobs.claim(_worker("stale"))
    assert jobs.reap_expired(lease_s=0) and conveyor.job(job_id).status == "retryable"
    [current] = wait_for(lambda: jobs.claim(_worker("current")), message="the retry to be due")
    assert (current.id, current.attempt) == (job_id, 2)

    with pytest.raises(LeaseLost):
        jobs.save_step(stale, "charge", {"by": "stale"})
    assert jobs.load_step(job_id, "charge") == (False, None)
    ran = []
    with pytest.raises(LeaseLost):
        run_step(stale, "charge", lambda: ran.append("stale") or {"by": "stale"})
    assert ran == [], "a worker without the lease must not even run the step"

    assert jobs.save_step(current, "charge", {"by": "current"}) == {"by": "current"}
    with pytest.raises(LeaseLost):  # even once the step exists
        jobs.save_step(stale, "charge", {"by": "stale"})
    assert jobs.load_step(job_id, "charge") == (True, {"by": "current"})
    assert run_step(current, "charge", lambda: ran.append("again")) == {"by": "current"}
    assert ran == []
    assert jobs.report(current, jobs.Outcome("succeeded", result={"ok": True}))
    assert not jobs.report(stale, jobs.Outcome("succeeded", result={"ok": "late"}))
    assert conveyor.job(job_id).result == {"ok": True}
    assert [a.fenced for a in conveyor.attempts(job_id)] == [True, False]
    assert_audit_clean(conveyor)
