"""SPEC §11 under real supervisors: a job type's concurrency, rate and group_concurrency hold
across every worker of every supervisor, and through kill -9. The oracle is the handlers'
own side-effect log (start and end of each run), compared with the limits; then the
database's history and `flask audit`."""
import os
import random
import signal
import time

import pytest

import handlers
from apiserver import api  # noqa: F401 (fixture)
from checks import LONG_LEASE, assert_audit_clean
from conftest import ROOT, TEST_HANDLERS, side_effects, wait_for
from core import flow
from models import Attempt, Job, QueueSetting, now

FLOW_HANDLERS = os.path.join(ROOT, "tests", "flow_handlers")
PATHS = {"HANDLER_PATHS": f"{TEST_HANDLERS}:{FLOW_HANDLERS}"}


@pytest.fixture
def flowing(conveyor):
    """The conveyor with the job types under limits loaded here and in its supervisors."""
    handlers.load([FLOW_HANDLERS])
    return conveyor


def supervisors(conveyor, count=2, concurrency=4, **env):
    env = {**PATHS, **LONG_LEASE, **env}
    started = [conveyor.start_supervisor(concurrency=concurrency, **env) for _ in range(count)]
    for supervisor in started:
        supervisor.wait_for_workers(concurrency)
    return started


def runs(effects_log):
    """{(job id, attempt): [start, end]} from the side-effect log (end None: not ended)."""
    spans = {}
    for event, job_id, attempt, moment in side_effects(effects_log):
        span = spans.setdefault((int(job_id), int(attempt)), [None, None])
        span[0 if event == "start" else 1] = float(moment)
    return spans


def most_at_once(spans):
    """The largest number of runs in progress at one instant."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at a tie
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


def most_started_within(starts, window_s):
    """The largest number of starts in any interval of window_s (sliding, not calendar)."""
    starts = sorted(starts)
    first, peak = 0, 0
    for last, moment in enumerate(starts):
        while moment - starts[first] >= window_s:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


# ---------------------------------------------------------------------------- load time

@pytest.mark.parametrize("option, value", [
    ("concurrency", 0), ("concurrency", -1), ("concurrency", 1.5), ("concurrency", "3"),
    ("concurrency", True), ("group_concurrency", 0), ("rate", "0/second"),
    ("rate", "10/day"), ("rate", "ten/second"), ("rate", 10), ("rate", "10/second;1/minute"),
    ("rate", "10 per second"), ("rate", "010/second")])
def test_a_bad_limit_stops_the_handler_from_loading_with_one_line(option, value):
    with pytest.raises(handlers.HandlerError) as refused:
        handlers.handler("flow.bad", **{option: value})
    assert option in str(refused.value) and "\n" not in str(refused.value)


def test_limits_reach_the_claim_as_each_type_declares_them(flowing):
    limits = flow.type_limits()
    assert limits["flow.capped"] == {"concurrency": 3, "rate": None, "group_concurrency": None}
    assert limits["flow.rated"]["rate"] == [20, 1.0]
    assert limits["flow.serial"]["group_concurrency"] == 1
    assert "flow.free" not in limits and "t.noop" not in limits


# ---------------------------------------------------------------------------- the limits hold

def test_concurrency_holds_across_two_supervisors(flowing, effects_log):
    supervisors(flowing)
    ids = flowing.submit_many("flow.capped", [{"log": effects_log, "s": 0.01}] * 600)
    flowing.wait_until_final(ids, timeout=120)

    spans = runs(effects_log)
    assert len(spans) == len(ids)
    assert most_at_once(spans.values()) == 3  # never more, and the limit was used
    assert set(flowing.statuses(ids).values()) == {"succeeded"}
    assert_audit_clean(flowing)


@pytest.mark.slow
def test_concurrency_holds_for_2000_jobs_on_eight_workers(flowing, effects_log):
    supervisors(flowing)
    ids = flowing.submit_many("flow.capped", [{"log": effects_log, "s": 0.002}] * 2000)
    flowing.wait_until_final(ids, timeout=240)
    assert 2 <= most_at_once(runs(effects_log).values()) <= 3  # SQLite's one writer may pace it
    assert_audit_clean(flowing)


def test_a_rate_holds_over_every_sliding_second(flowing, effects_log):
    supervisors(flowing)
    ids = flowing.submit_many("flow.rated", [{"log": effects_log}] * 100)
    flowing.wait_until_final(ids, timeout=60)

    starts = [start for start, _ in runs(effects_log).values()]
    assert len(starts) == 100
    assert most_started_within(starts, 1.0) <= 20
    assert max(starts) - min(starts) >= 4.0  # 100 starts at 20 a second take 4 s at least


def test_one_group_runs_one_at_a_time_while_ten_groups_run_side_by_side(flowing, effects_log):
    supervisors(flowing)
    groups = [f"customer-{n}" for n in range(10)]
    ids = {}
    for n in range(200):
        group = groups[n % 10]
        [job_id] = flowing.submit_many("flow.serial", [{"log": effects_log, "s": 0.02}],
                                       group=group)
        ids[job_id] = group
    flowing.wait_until_final(ids, timeout=120)

    spans = runs(effects_log)
    for group in groups:
        assert most_at_once([spans[job_id, 1] for job_id, g in ids.items() if g == group]) == 1
    assert most_at_once(spans.values()) >= 4  # the groups progressed in parallel
    assert_audit_clean(flowing)


def test_a_held_job_waits_available_and_loses_no_attempt(flowing, effects_log):
    supervisors(flowing, count=1)
    ids = flowing.submit_many("flow.capped", [{"log": effects_log, "s": 2}] * 6)
    wait_for(lambda: len(runs(effects_log)) == 3, message="three running")
    held = [job_id for job_id in ids if (job_id, 1) not in runs(effects_log)]
    assert len(held) == 3
    rows = Job.select().where(Job.id.in_(held))
    assert {(job.status, job.attempt) for job in rows} == {("available", 0)}
    flowing.wait_until_final(ids, timeout=30)
    assert {a.number for a in Attempt.select().where(Attempt.job_id.in_(ids))} == {1}


def test_a_queues_concurrency_holds_for_jobs_of_any_type(flowing, effects_log):
    QueueSetting.insert(name="narrow", concurrency=2, updated_at=now()).execute()
    supervisors(flowing)
    ids = flowing.submit_many("flow.free", [{"log": effects_log, "s": 0.05}] * 60,
                              queue="narrow")
    flowing.wait_until_final(ids, timeout=60)
    assert most_at_once(runs(effects_log).values()) == 2


# ---------------------------------------------------------------------------- under fire

def kill_running_workers(supervisors, seconds, seed=7):
    """kill -9, every half second, a worker of one of `supervisors` that runs an attempt (an
    idle one costs nothing to kill, and proves nothing). A worker that runs jobs under a
    limit keeps its place while it has more to take, so the workers running them may all
    be one supervisor's."""
    chaos = random.Random(seed)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        busy = {a.pid for a in Attempt.select(Attempt.pid).where(Attempt.status == "running")}
        pids = sorted(busy & {pid for supervisor in supervisors for pid in supervisor.worker_pids()})
        if pids:
            os.kill(chaos.choice(pids), signal.SIGKILL)  # its running attempt is crashed
        time.sleep(0.5)  # the pace of the chaos, not a wait for a condition


def runs_through_crashes(effects_log, ids):
    """runs(), a run killed mid-way ending when its crash was recorded: it held its place
    until then (the database's clock is this machine's)."""
    spans = runs(effects_log)
    killed = {(a.job_id, a.number): a.finished_at for a in Attempt.select().where(
        Attempt.job_id.in_(ids), Attempt.status == "crashed")}
    assert killed, "the chaos killed no running attempt"
    for run, span in spans.items():
        if span[1] is None:
            span[1] = killed[run]
    return spans


@pytest.mark.slow
def test_limits_hold_while_workers_and_a_supervisor_are_killed(flowing, effects_log):
    doomed, survivor = supervisors(flowing, LEASE_S=3)
    ids = flowing.submit_many("flow.capped", [{"log": effects_log, "s": 0.05}] * 300)
    kill_running_workers([doomed, survivor], 8)
    doomed.kill_host()
    flowing.wait_until_final(ids, timeout=180)

    assert set(flowing.statuses(ids).values()) == {"succeeded"}
    assert most_at_once(runs_through_crashes(effects_log, ids).values()) <= 3
    assert_audit_clean(flowing)


@pytest.mark.slow
def test_a_group_and_a_rate_hold_while_workers_are_killed(flowing, effects_log):
    supervisors(flowing, count=1, LEASE_S=3)
    survivor = flowing.supervisors[0]
    groups = {}
    for n in range(120):
        [job_id] = flowing.submit_many("flow.serial", [{"log": effects_log, "s": 0.1}],
                                       group=f"customer-{n % 4}")
        groups[job_id] = n % 4
    rated_log = effects_log + ".rated"
    rated = flowing.submit_many("flow.rated", [{"log": rated_log, "s": 0.05}] * 80)
    kill_running_workers([survivor], 6, seed=11)
    flowing.wait_until_final(list(groups) + rated, timeout=180)

    assert set(flowing.statuses(list(groups) + rated).values()) == {"succeeded"}
    spans = runs_through_crashes(effects_log, list(groups))
    for group in range(4):
        assert most_at_once([span for (job_id, _), span in spans.items()
                             if groups[job_id] == group]) == 1
    starts = [start for start, _ in runs(rated_log).values()]
    assert most_started_within(starts, 1.0) <= 20
    assert_audit_clean(flowing)


# ---------------------------------------------------------------------------- a job's group

def test_a_jobs_group_is_stored_and_shown(api):
    key = api.key("me")
    created = api.call("POST", "/v1/jobs", key, json={
        "type": "t.noop", "payload": {}, "group": "customer-42"})
    assert created.status_code == 201 and created.get_json()["group"] == "customer-42"
    shown = api.call("GET", f"/v1/jobs/{created.get_json()['id']}", key).get_json()
    assert shown["group"] == "customer-42"
    plain = api.call("POST", "/v1/jobs", key, json={"type": "t.noop"}).get_json()
    assert plain["group"] is None


@pytest.mark.parametrize("group", ["", "x" * 201, 42, None, ["a"]])
def test_a_bad_group_is_422_naming_the_field_and_in_a_batch_the_index(api, group):
    key = api.key("me")
    single, batch = api.refused(key, {"group": group}, good={"group": "fine"})
    assert any(error.startswith("group") for error in single)
    assert any(error.startswith("1: group") for error in batch)
    assert Job.select().count() == 0


# ---------------------------------------------------------------------------- fair share

def test_a_keys_backlog_does_not_hold_up_another_keys_jobs(flowing, effects_log):
    """Key A submits 20,000 jobs, then key B submits 20: B's jobs start within a few job
    durations, not after A's backlog (oldest first would make them wait for all of it)."""
    from core import jobs, submission
    from conftest import rules
    supervisors(flowing)
    job = submission.validate_submission(
        {"type": "flow.free", "payload": {"log": effects_log, "s": 0.005}}, rules())
    for _ in range(20):
        jobs.enqueue([job] * 1000, api_key_id=1)
    submitted_at = time.time()
    late = [stored.id for stored, _ in jobs.enqueue([job] * 20, api_key_id=2)]
    wait_for(lambda: all((job_id, 1) in runs(effects_log) for job_id in late), timeout=30,
             message="key B's jobs to start")

    spans = runs(effects_log)
    waited = max(spans[job_id, 1][0] for job_id in late) - submitted_at
    waiting = Job.select().where(Job.api_key_id == 1, Job.status == "available").count()
    print(f"key B's 20 jobs all started {waited * 1000:.0f} ms after they were submitted, "
          f"with {waiting:,} of key A's jobs still waiting")
    # A's backlog takes 20,000 x 5 ms / 8 workers = 12.5 s at the very least.
    assert waited < 1.5 and waiting > 10_000
