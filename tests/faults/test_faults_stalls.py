"""Scenario 5 of the fault-injection harness: workers stalled (SIGSTOP) past their lease
under load, then resumed: their late outcomes are refused, nothing runs twice."""
import pytest

from harness import seed, worker_stalls

STALL_JOBS = 2000  # enough for several stalls, however fast the drain


@pytest.mark.slow
def test_stalled_workers_late_outcomes_are_refused_under_load(conveyor):
    figures = worker_stalls(conveyor, STALL_JOBS, seed())
    print(figures.line())
    assert figures.clean, figures.report()
    assert figures.stalls >= 3, figures.line()
