"""The retry policy of SPEC §5 as pure decisions (core/policy.py): where a job goes when its
attempt ends, its backoff, the order a claim runs in. No database, no processes, no
fixtures; the whole file runs in milliseconds. test_retries.py checks the same rules end
to end, through real workers and a real database."""
import random
from types import SimpleNamespace

from core.policy import (Outcome, Transition, backoff_delay, next_transition, released_outcome,
                         run_order)

FAILED = Outcome("failed", error_type="ValueError", error_message="boom")
COUNTED = ("failed", "crashed", "timed_out", "interrupted")  # each one uses an attempt


def _cap(n, base_s, max_s):
    """SPEC §5's ceiling for the delay after attempt n, written out independently."""
    return min(max_s, base_s * 2 ** (n - 1))


def _job(attempt, max_attempts=5, attempt_base=0, base_s=1.0, max_s=100.0):
    return SimpleNamespace(attempt=attempt, attempt_base=attempt_base, max_attempts=max_attempts,
                           backoff_base_s=base_s, backoff_max_s=max_s)


# ---------------------------------------------------------------------------- backoff

def test_backoff_delay_is_full_jitter_under_a_capped_exponential():
    caps = [backoff_delay(n, 0.5, 10, rand=lambda: 1.0) for n in range(1, 9)]
    assert caps == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert [backoff_delay(n, 0.5, 10, rand=lambda: 0.0) for n in range(1, 9)] == [0] * 8
    assert backoff_delay(3, 1, 100, rand=lambda: 0.25) == 1.0
    seeded = random.Random(13)
    samples = [backoff_delay(3, 1, 100, rand=seeded.random) for _ in range(4000)]
    assert all(0 <= s <= 4 for s in samples)
    assert min(samples) < 0.2 and max(samples) > 3.8  # the full range, not a fixed delay
    assert 1.8 < sum(samples) / len(samples) < 2.2


def test_backoff_of_huge_attempt_numbers_stays_at_the_cap_without_overflow():
    # A budget of thousands of attempts is allowed (decorator, DEFAULT_MAX_ATTEMPTS):
    # the exponent must never overflow, and a zero base stays zero.
    assert backoff_delay(5000, 1, 60, rand=lambda: 1.0) == 60
    assert backoff_delay(5000, 0, 60, rand=lambda: 1.0) == 0
    assert backoff_delay(10 ** 12, 1, 3600, rand=lambda: 1.0) == 3600
    assert next_transition(_job(5000, max_attempts=10_000), FAILED, rand=lambda: 1.0) == \
        Transition("retryable", delay_s=100.0)
    assert next_transition(_job(10_000, max_attempts=10_000), FAILED) == \
        Transition("dead", dead_reason="max_attempts")


# ---------------------------------------------------------------------------- next_transition

def test_a_succeeded_attempt_succeeds_even_when_it_was_the_last():
    assert next_transition(_job(1), Outcome("succeeded", result=1)) == Transition("succeeded")
    assert next_transition(_job(5), Outcome("succeeded")) == Transition("succeeded")


def test_a_failure_with_attempts_left_retries_after_a_jittered_backoff():
    for n in range(1, 5):
        cap = _cap(n, 0.5, 3)
        for status in ("failed", "crashed", "timed_out"):
            job = _job(n, base_s=0.5, max_s=3)
            assert next_transition(job, Outcome(status), rand=lambda: 1.0) == \
                Transition("retryable", delay_s=cap), (n, status)
            assert next_transition(job, Outcome(status), rand=lambda: 0.0) == \
                Transition("retryable", delay_s=0.0), (n, status)
            seeded = random.Random(n)
            delays = [next_transition(job, Outcome(status), rand=seeded.random)
                      for _ in range(300)]
            assert {d.status for d in delays} == {"retryable"}
            assert all(0 <= d.delay_s <= cap for d in delays)
            assert max(d.delay_s for d in delays) > 0.9 * cap
            assert min(d.delay_s for d in delays) < 0.1 * cap


def test_the_backoff_is_random_when_no_random_is_given():
    delays = {next_transition(_job(3), FAILED).delay_s for _ in range(50)}
    assert len(delays) > 1 and all(0 <= d <= _cap(3, 1.0, 100.0) for d in delays)


def test_a_failure_on_the_last_attempt_is_dead_for_max_attempts():
    for status in COUNTED:
        assert next_transition(_job(5), Outcome(status)) == \
            Transition("dead", dead_reason="max_attempts"), status
    assert next_transition(_job(1, max_attempts=1), FAILED) == \
        Transition("dead", dead_reason="max_attempts")


def test_permanent_is_dead_at_once_whatever_attempts_are_left():
    assert next_transition(_job(1), Outcome("failed", permanent=True)) == \
        Transition("dead", dead_reason="permanent")
    assert next_transition(_job(5), Outcome("failed", permanent=True)) == \
        Transition("dead", dead_reason="permanent")


def test_retry_after_retries_at_that_delay_and_still_counts():
    assert next_transition(_job(2), Outcome("failed", retry_in=9.5)) == \
        Transition("retryable", delay_s=9.5)
    assert next_transition(_job(2), Outcome("failed", retry_in=0)) == \
        Transition("retryable", delay_s=0)  # "now", not the backoff
    assert next_transition(_job(2, max_s=5), Outcome("failed", retry_in=60)) == \
        Transition("retryable", delay_s=60)  # the handler's delay, not capped by the backoff
    assert next_transition(_job(2, max_attempts=2), Outcome("failed", retry_in=9)) == \
        Transition("dead", dead_reason="max_attempts")  # RetryAfter still counts


def test_an_interrupted_attempt_retries_at_once_and_counts():
    assert next_transition(_job(3), Outcome("interrupted")) == \
        Transition("retryable", delay_s=0.0)
    assert next_transition(_job(5), Outcome("interrupted")) == \
        Transition("dead", dead_reason="max_attempts")


def test_crashed_and_timed_out_attempts_count_like_failures():
    for status in ("crashed", "timed_out"):
        assert next_transition(_job(4), Outcome(status), rand=lambda: 1.0) == \
            Transition("retryable", delay_s=_cap(4, 1.0, 100.0)), status
        assert next_transition(_job(5), Outcome(status)) == \
            Transition("dead", dead_reason="max_attempts"), status


def test_a_cancelled_attempt_cancels_the_job():
    assert next_transition(_job(1), Outcome("cancelled")) == Transition("cancelled")
    assert next_transition(_job(5), Outcome("cancelled")) == Transition("cancelled")


def test_a_released_attempt_goes_back_to_available_refunded_even_when_it_was_the_last():
    released = released_outcome("its worker 7 ended first")
    assert released.status == "released" and released.error_type == "Released"
    assert released.error_message == \
        "claimed but not started: its worker 7 ended first; it does not count"
    for attempt in (1, 5):
        assert next_transition(_job(attempt), released) == \
            Transition("available", refund=True), attempt
    assert not any(next_transition(_job(1), Outcome(status), rand=lambda: 0.5).refund
                   for status in ("succeeded", "cancelled", *COUNTED))


def test_a_dlq_retry_gives_a_fresh_budget_from_attempt_base():
    # Attempts before attempt_base do not count, and the backoff starts over.
    assert next_transition(_job(7, max_attempts=5, attempt_base=5), FAILED).status == \
        "retryable"
    assert next_transition(_job(10, max_attempts=5, attempt_base=5), FAILED) == \
        Transition("dead", dead_reason="max_attempts")
    assert next_transition(_job(6, attempt_base=5), FAILED, rand=lambda: 1.0) == \
        Transition("retryable", delay_s=_cap(1, 1.0, 100.0))


def test_an_outcome_says_its_error_as_last_error_shows_it():
    assert FAILED.error == "ValueError: boom"
    assert Outcome("failed", error_type="Timeout").error == "Timeout"
    assert Outcome("succeeded", result={"ok": True}).error is None


# ---------------------------------------------------------------------------- run_order

def test_a_claim_runs_lowest_priority_first_then_earliest_due_then_oldest():
    def job(id, priority, run_at):
        return SimpleNamespace(id=id, priority=priority, run_at=run_at)

    claim = [job(1, 5, 10.0), job(2, 0, 30.0), job(3, 0, 20.0), job(4, -1, 99.0),
             job(5, 0, 20.0)]
    assert [j.id for j in sorted(claim, key=run_order)] == [4, 3, 5, 2, 1]
