"""What the supervisor does to its workers: kill an attempt past its timeout, shut down
gracefully on SIGTERM (and interrupt what outlives the grace period), and back off when a
worker keeps dying."""
import re
import signal
import time

from core import workers
from checks import (LONG_LEASE, alive, assert_audit_clean, assert_one_attempt_at_a_time,
                    attempt_status, effect_seen, gate_path, log_line, release, running_attempt)
from conftest import side_effects, wait_for


def test_attempt_past_its_timeout_is_killed_and_retried(conveyor, effects_log, tmp_path):
    supervisor = conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    [first_worker] = supervisor.wait_for_workers(1)
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log},
                             timeout_s=1, max_attempts=2)
    stuck = running_attempt(conveyor, job_id, 1)
    assert stuck.pid == first_worker

    timed_out = attempt_status(conveyor, job_id, 1, "timed_out", "crashed", "failed",
                               "succeeded", timeout=10)
    assert timed_out.status == "timed_out" and timed_out.error_type == "Timeout"
    assert "timeout of 1s" in timed_out.error_message
    assert 1.0 <= timed_out.finished_at - timed_out.started_at < 4.0
    wait_for(lambda: not alive(first_worker), timeout=5, message="the timed-out worker to die")
    job = conveyor.wait_for_status(job_id, "succeeded", timeout=10)
    retried = conveyor.attempts(job_id)[1]
    [replacement] = supervisor.wait_for_workers(1)
    assert retried.pid == replacement != first_worker
    assert job.result == {"attempt": 2, "pid": replacement}
    assert not any(line[:3] == ["end", str(job_id), "1"] for line in side_effects(effects_log))
    log_line(supervisor, "attempt timed out after 1s")
    assert_audit_clean(conveyor)


def test_sigterm_lets_running_attempts_finish_and_claims_nothing_new(conveyor, effects_log,
                                                                    tmp_path):
    supervisor = conveyor.start_supervisor(concurrency=2, SHUTDOWN_GRACE_S=20, **LONG_LEASE)
    gate = gate_path(tmp_path)
    running = [conveyor.submit("t.gate", {"gate": f"{gate}-{i}", "hold": [1],
                                          "log": effects_log}) for i in range(2)]
    for job_id in running:
        running_attempt(conveyor, job_id, 1)
        effect_seen(effects_log, "start", job_id, 1)
    waiting = conveyor.submit_many("t.noop", [{"log": effects_log}] * 3)

    started = time.monotonic()
    supervisor.signal(signal.SIGTERM)
    log_line(supervisor, "shutting down")
    for i in range(2):
        release(f"{gate}-{i}", 1)

    assert supervisor.wait(15) == 0
    assert time.monotonic() - started < 15
    for job_id in running:
        job = conveyor.job(job_id)
        assert job.status == "succeeded" and job.result["attempt"] == 1
        [attempt] = conveyor.attempts(job_id)
        assert attempt.status == "succeeded"
    for job_id in waiting:
        assert conveyor.job(job_id).status == "available" and conveyor.attempts(job_id) == []
    assert not any(line[0] == "run" for line in side_effects(effects_log))
    assert "interrupted" not in supervisor.log()
    assert workers.live_workers(lease_s=60) == []  # every worker deregistered on the way out
    assert_audit_clean(conveyor)


def test_attempt_outliving_the_grace_period_is_interrupted_and_retried(conveyor, effects_log,
                                                                      tmp_path):
    first = conveyor.start_supervisor(concurrency=1, SHUTDOWN_GRACE_S=1, **LONG_LEASE)
    gate = gate_path(tmp_path)
    job_id = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log})
    held = running_attempt(conveyor, job_id, 1)
    effect_seen(effects_log, "start", job_id, 1)

    started = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    assert 1.0 <= time.monotonic() - started < 10

    [interrupted] = conveyor.attempts(job_id)
    assert interrupted.status == "interrupted" and interrupted.error_type == "Interrupted"
    assert not alive(held.pid)
    assert conveyor.job(job_id).status in ("available", "retryable")
    second = conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    job = conveyor.wait_for_status(job_id, "succeeded")
    retried = conveyor.attempts(job_id)[1]
    assert retried.pid in second.worker_pids()
    assert job.result == {"attempt": 2, "pid": retried.pid}
    assert not any(line[:3] == ["end", str(job_id), "1"] for line in side_effects(effects_log))
    assert_one_attempt_at_a_time(conveyor.attempts(job_id))
    assert_audit_clean(conveyor)


def test_worker_crash_loop_is_restarted_with_growing_delays(conveyor, effects_log):
    supervisor = conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    job_id = conveyor.submit("t.crash", {"log": effects_log}, max_attempts=5)

    job = conveyor.wait_for_status(job_id, "dead", timeout=40)

    assert job.dead_reason == "max_attempts" and job.attempt == 5
    attempts = conveyor.attempts(job_id)
    assert [a.status for a in attempts] == ["crashed"] * 5
    assert all(a.error_type == "WorkerDied" and "SIGKILL" in a.error_message for a in attempts)
    assert "WorkerDied" in job.last_error
    assert len({a.pid for a in attempts}) == 5, "each attempt ran in a fresh worker"
    assert [line[:3] for line in side_effects(effects_log)] == [
        ["run", str(job_id), str(n)] for n in range(1, 6)]
    delays = [float(d) for d in re.findall(r"keeps dying \(\d+ times in a row\); restarting in "
                                           r"(\d+)s", supervisor.log())]
    assert delays[:3] == [1, 2, 4], supervisor.log()
    starts = [a.started_at for a in attempts]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    # Each restart waited out its delay: 1s, 2s, then 4s between attempts 2..5.
    assert gaps[1] >= 1.0 and gaps[2] >= 2.0 and gaps[3] >= 4.0, gaps
    assert supervisor.proc.poll() is None, "the supervisor itself must survive the crash loop"
    assert_audit_clean(conveyor)
