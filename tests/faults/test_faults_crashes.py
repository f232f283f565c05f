"""Scenarios 1 and 2 of the fault-injection harness: worker processes, and whole
supervisors with their workers, killed -9 under load; and the supervisor bugs those runs
found."""
import os
import signal
import threading
import time

import pytest

from checks import LONG_LEASE
from conftest import WITH_PGBOUNCER, wait_for
from harness import host_chaos, seed, worker_chaos

WORKER_CHAOS_JOBS = 2000
HOST_CHAOS_JOBS = 1500


@pytest.mark.slow
@pytest.mark.parametrize("database_url", WITH_PGBOUNCER, indirect=True)
def test_nothing_lost_or_run_twice_while_workers_are_killed(conveyor):
    figures = worker_chaos(conveyor, WORKER_CHAOS_JOBS, seed())
    print(figures.line())
    assert figures.clean, figures.report()
    assert figures.kills >= 20, figures.line()


@pytest.mark.slow
def test_nothing_lost_or_run_twice_while_hosts_are_killed(conveyor):
    figures = host_chaos(conveyor, HOST_CHAOS_JOBS, seed(), kill_every_s=1.0)  # a short run
    print(figures.line())
    assert figures.clean, figures.report()
    assert figures.kills >= 3 and figures.restarts == figures.kills, figures.line()


def test_worker_killed_after_finishing_attempts_is_replaced_at_once(conveyor, effects_log):
    # Kills from outside (an OOM killer, an operator) are not a crash loop: the pool must
    # not back off, or a few kills a minute starve it.
    supervisor = conveyor.start_supervisor(concurrency=1, **LONG_LEASE)
    replacing = 0.0
    for _ in range(4):
        [worker] = supervisor.wait_for_workers(1)
        ids = conveyor.submit_many("t.noop", [{"log": effects_log}] * 2)
        conveyor.wait_until_final(ids)
        assert {conveyor.attempts(job_id)[0].pid for job_id in ids} == {worker}
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: supervisor.worker_pids() not in ([], [worker]), timeout=20,
                 message="a new worker")
        replacing += time.monotonic() - killed
    assert "keeps dying" not in supervisor.log()
    assert replacing < 3.5, f"four replacements took {replacing:.1f}s"  # backing off: 7s+


def test_slot_of_a_worker_killed_mid_write_does_not_hang_its_supervisor():
    from supervisor import slots
    [slot] = slots.allocate(1)
    for _ in range(200):  # a worker that does nothing but post attempts, killed at random
        pid = os.fork()
        if pid == 0:
            while True:
                slot.start(7, 1, 1.0, 1.0)
                slot.clear()
        time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if slot.torn():
            break
    else:
        pytest.skip("no kill landed mid-write in 200 tries")

    read = []
    reader = threading.Thread(target=lambda: read.append(slot.read()), daemon=True)
    reader.start()
    reader.join(5)
    assert read == [None], "reading a torn slot must give up, not spin"  # it is not trusted
    slot.clear()
    slot.start(9, 2, 3.0, 4.0)
    assert slot.read() == slots.Running(9, 2, 3.0, 4.0)  # the next writes make it whole
