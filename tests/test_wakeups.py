"""Wake-ups through LISTEN/NOTIFY: an announced job wakes one idle worker, not all of them,
and a lost LISTEN connection costs latency, never a job.

The end-to-end tests run workers that poll only every 15 to 30 s (POLL_INTERVAL_S=30), so
a job that starts within seconds was started by a wake-up, not by a poll."""
import select
import threading
import time

import pytest

from core import jobs
from conftest import wait_for
from supervisor import slots
from supervisor.wakeups import WakePipe, wake_for

SLOW_POLL = {"POLL_INTERVAL_S": "30"}


def _woken(pipes):
    readable, _, _ = select.select([pipe.read_fd for pipe in pipes], [], [], 0)
    return [pipes.index(next(p for p in pipes if p.read_fd == fd)) for fd in readable]


@pytest.fixture
def workers():
    """Four real slots in shared memory and four real pipes: waiting, waiting, claiming,
    busy."""
    states = [slots.WAITING, slots.WAITING, slots.CLAIMING, slots.BUSY]
    pairs = list(zip(slots.allocate(len(states)), [WakePipe() for _ in states]))
    for (slot, _), state in zip(pairs, states):
        slot.state = state
    return pairs


def test_one_job_wakes_one_waiting_worker(workers):
    pipes = [pipe for _, pipe in workers]
    assert wake_for({"default": 1}, (), workers) == 1
    assert _woken(pipes) == [0]


def test_more_jobs_wake_the_waiting_then_the_claiming_never_the_busy(workers):
    pipes = [pipe for _, pipe in workers]
    assert wake_for({"default": 2, "emails": 5}, (), workers) == 3
    assert sorted(_woken(pipes)) == [0, 1, 2]


def test_jobs_of_queues_the_supervisor_does_not_serve_wake_nobody(workers):
    pipes = [pipe for _, pipe in workers]
    assert wake_for({"reports": 3}, ("emails", "default"), workers) == 0
    assert _woken(pipes) == []
    assert wake_for({"reports": 3, "emails": 1}, ("emails", "default"), workers) == 1


def test_a_drained_pipe_sleeps_again(workers):
    _, pipe = workers[0]
    for _ in range(3):
        pipe.wake()
    pipe.drain()
    assert _woken([pipe]) == []


def _listener_pids(conveyor):
    import models
    rows = models.db.execute_sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query = %s AND pid <> pg_backend_pid()", (f"LISTEN {jobs.NOTIFY_CHANNEL}",))
    return [pid for (pid,) in rows.fetchall()]


def _start_idle(conveyor, concurrency):
    """A supervisor whose workers have all made their first (empty) claim and sleep."""
    supervisor = conveyor.start_supervisor(concurrency=concurrency, **SLOW_POLL)
    supervisor.wait_for_workers(concurrency)
    wait_for(lambda: _listener_pids(conveyor), timeout=10, message="the supervisor to LISTEN")
    return supervisor


@pytest.mark.postgres
def test_an_announced_job_starts_at_once_on_idle_workers(pg_conveyor):
    _start_idle(pg_conveyor, 4)
    for n in range(5):
        job_id = pg_conveyor.submit("t.noop", {"n": n})
        pg_conveyor.wait_for_status(job_id, "succeeded", timeout=8)


@pytest.mark.postgres
def test_a_batch_wakes_enough_workers_to_share_it(pg_conveyor):
    _start_idle(pg_conveyor, 4)
    job_ids = pg_conveyor.submit_many("t.sleep", [{"s": 1.0}] * 4)
    pg_conveyor.wait_until_final(job_ids, timeout=8)
    workers = {pg_conveyor.attempts(job_id)[0].worker_id for job_id in job_ids}
    assert len(workers) >= 2, "one job per announced job wakes a worker, so they share"


@pytest.mark.postgres
def test_a_lost_listen_connection_costs_latency_not_jobs(pg_conveyor):
    import models
    supervisor = _start_idle(pg_conveyor, 2)
    [first] = _listener_pids(pg_conveyor)
    models.db.execute_sql("SELECT pg_terminate_backend(%s)", (first,))
    # Submitted while nobody listens: the supervisor reconnects (within about a second)
    # and then wakes its workers, who find the job; the poll would take 15 s or more.
    job_id = pg_conveyor.submit("t.noop", {"n": "unheard"})
    pg_conveyor.wait_for_status(job_id, "succeeded", timeout=10)
    [second] = wait_for(lambda: [p for p in _listener_pids(pg_conveyor) if p != first],
                        timeout=10, message="the supervisor to LISTEN again")
    # And announcements reach it again.
    job_id = pg_conveyor.submit("t.noop", {"n": "heard"})
    pg_conveyor.wait_for_status(job_id, "succeeded", timeout=8)
    assert "lost the connection that listens for new jobs" in supervisor.log()


@pytest.mark.postgres
def test_a_followup_wakes_an_idle_worker_at_once(pg_conveyor):
    """A success's follow-up jobs are stored by the step that records it, after that
    step's claim: the worker that ran the parent claims nothing and sleeps. They are
    announced at that step's commit, so it wakes and starts them at once."""
    from models import Job
    _start_idle(pg_conveyor, 1)
    parent = pg_conveyor.submit("t.gate", {"hold": [], "followups": [
        {"type": "t.noop", "payload": {"n": "followup"}}]})
    pg_conveyor.wait_for_status(parent, "succeeded", timeout=8)
    [child] = Job.select().where(Job.parent_id == parent)
    pg_conveyor.wait_for_status(child.id, "succeeded", timeout=8)


def test_a_worker_waiting_out_an_outage_retries_as_soon_as_it_is_woken(conveyor):
    """A worker retries a failing database operation with a backoff of up to 2 s. The
    supervisor wakes every worker when its LISTEN connection is back after an outage (a
    failover, a restart), and a woken worker retries at once rather than at the end of
    its wait: after five failures that wait is 1.6 s."""
    import models
    from infra.config import settings
    from supervisor.worker import WorkerProcess
    worker = WorkerProcess(None, None, WakePipe(), settings())
    tries = []

    def operation():
        tries.append(time.monotonic())
        if len(tries) <= 5:
            models.db.execute_sql("SELECT * FROM no_such_table")  # a real database error
        return "done"

    def supervisor():
        wait_for(lambda: len(tries) == 5, timeout=10, message="five failures")
        worker.pipe.wake()

    waker = threading.Thread(target=supervisor)
    waker.start()
    try:
        assert worker._until_done(operation) == "done"
    finally:
        waker.join()
    assert len(tries) == 6
    assert tries[5] - tries[4] < 1.0, "the wake-up cut the 1.6 s wait short"
    assert tries[4] - tries[0] >= 1.4, "unwoken, it waited 0.1 + 0.2 + 0.4 + 0.8 s"
