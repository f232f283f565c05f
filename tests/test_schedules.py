"""Scheduling (SPEC §8): delayed jobs, and recurring schedules that fire each slot exactly
once however many supervisors run, never overlap under "skip", and survive a supervisor
killed mid-run."""
import threading
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from core import jobs
from core import schedules
from conftest import wait_for, rules
from core.errors import Conflict, Invalid
from models import Attempt, Job, ScheduleRun


def runs_of(name):
    return list(ScheduleRun.select().where(ScheduleRun.schedule_name == name)
                .order_by(ScheduleRun.slot))


def job_intervals(job_ids):
    """(first attempt start, last attempt end) of each job, ordered by start."""
    spans = []
    for job_id in job_ids:
        attempts = list(Attempt.select().where(Attempt.job_id == job_id).order_by(Attempt.number))
        if attempts:
            spans.append((attempts[0].started_at, attempts[-1].finished_at or float("inf"), job_id))
    return sorted(spans)


def overlapping_pairs(spans):
    return [(a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]


# ---------------------------------------------------------------- rules, on a clock we control

def test_new_schedule_first_fires_at_its_next_slot(conveyor):
    schedule = schedules.create({"name": "tick", "cron": "* * * * *", "type": "t.noop"}, rules())
    created = schedule.created_at
    assert schedule.next_run_at > created
    assert schedule.next_run_at == croniter("* * * * *", datetime.fromtimestamp(
        created, timezone.utc)).get_next(float)
    assert schedules.fire_due(schedule.next_run_at - 0.001, rules=rules()) == []
    [run] = schedules.fire_due(schedule.next_run_at, rules=rules())
    assert run.outcome == "enqueued" and run.slot == schedule.next_run_at
    assert conveyor.job(run.job_id).type == "t.noop"


def test_a_slot_fires_once_however_often_it_is_asked(conveyor):
    schedule = schedules.create({"name": "tick", "cron": "* * * * *", "type": "t.noop"}, rules())
    slot = schedule.next_run_at
    fired = [run for _ in range(5) for run in schedules.fire_due(slot + 1, rules=rules())]
    assert len(fired) == 1
    assert len(runs_of("tick")) == 1
    assert Job.select().count() == 1


def test_concurrent_firing_of_one_slot_enqueues_one_job(conveyor):
    """Eight threads, each with its own database connection, race for the same slot."""
    schedule = schedules.create({"name": "race", "cron": "* * * * *", "type": "t.noop",
                                 "overlap": "allow"}, rules())
    slot = schedule.next_run_at
    barrier = threading.Barrier(8)
    fired, errors = [], []

    def fire():
        try:
            barrier.wait()
            fired.extend(schedules.fire_due(slot + 0.5, rules=rules()))
        except Exception as exc:  # surfaced below: a lost race must not be an error
            errors.append(exc)
        finally:
            import models
            models.reset_connection()

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(fired) == 1
    assert [(r.slot, r.outcome) for r in runs_of("race")] == [(slot, "enqueued")]
    assert Job.select().count() == 1


def test_skip_records_a_slot_skipped_while_the_previous_run_is_unfinished(conveyor):
    schedule = schedules.create({"name": "slow", "cron": "* * * * *", "type": "t.noop"}, rules())
    first_slot = schedule.next_run_at
    [first] = schedules.fire_due(first_slot, rules=rules())
    [second] = schedules.fire_due(first_slot + 60, rules=rules())
    assert second.outcome == "skipped" and second.job_id is None
    assert f"job {first.job_id}" in second.reason

    jobs.cancel(first.job_id)  # the previous run is finished now
    [third] = schedules.fire_due(first_slot + 120, rules=rules())
    assert third.outcome == "enqueued"
    assert [r.outcome for r in runs_of("slow")] == ["enqueued", "skipped", "enqueued"]


def test_allow_enqueues_every_slot_even_while_one_runs(conveyor):
    schedule = schedules.create({"name": "each", "cron": "* * * * *", "type": "t.noop",
                                 "overlap": "allow"}, rules())
    slot = schedule.next_run_at
    outcomes = [run.outcome for minute in range(3) for run in schedules.fire_due(slot + 60 * minute, rules=rules())]
    assert outcomes == ["enqueued"] * 3
    assert Job.select().where(Job.status == "available").count() == 3


def test_after_downtime_only_the_latest_missed_slot_runs(conveyor):
    schedule = schedules.create({"name": "catchup", "cron": "*/5 * * * *", "type": "t.noop",
                                 "overlap": "allow"}, rules())
    first = schedule.next_run_at
    down_until = first + 3 * 3600 + 7 * 60  # 3h07 of slots missed
    [run] = schedules.fire_due(down_until, rules=rules())
    assert run.slot == first + 3 * 3600 + 5 * 60  # the latest slot at or before the restart
    assert len(runs_of("catchup")) == 1
    assert schedules.get("catchup").next_run_at == run.slot + 300


def test_paused_schedule_does_not_fire_and_resumes_from_its_next_slot(conveyor):
    schedule = schedules.create({"name": "nap", "cron": "* * * * *", "type": "t.noop"}, rules())
    slot = schedule.next_run_at
    schedules.set_paused("nap", True, rules())
    assert schedules.fire_due(slot + 600, rules=rules()) == []
    resumed = schedules.set_paused("nap", False, rules())
    assert resumed.next_run_at > jobs.db_time()  # missed slots while paused are not replayed
    assert schedules.upcoming(resumed, 2)[0] == resumed.next_run_at


def test_schedule_runs_enqueue_the_templated_job(conveyor):
    schedules.create({"name": "report", "cron": "0 * * * *", "type": "t.schema",
                      "payload": {"to": "ops@example.com"}, "queue": "reports", "priority": -5}, rules())
    [run] = schedules.fire_due(schedules.get("report").next_run_at, rules=rules())
    job = conveyor.job(run.job_id)
    assert (job.type, job.payload, job.queue, job.priority) == (
        "t.schema", {"to": "ops@example.com"}, "reports", -5)
    assert job.idempotency_key.startswith("schedule:report:")


@pytest.mark.parametrize("tz, cron, start", [
    ("Europe/Berlin", "30 2 * * *", "2026-03-28T12:00:00"),   # spring forward: 02:30 missing
    ("Europe/Berlin", "30 2 * * *", "2026-10-24T12:00:00"),   # fall back: 02:30 twice
    ("America/New_York", "0 9 * * 1-5", "2026-03-06T12:00:00"),
    ("Australia/Lord_Howe", "*/30 1-3 * * *", "2026-04-04T12:00:00"),  # a 30-minute DST shift
    ("UTC", "15 */6 * * *", "2026-12-31T20:00:00"),
])
def test_next_runs_follow_croniter_in_the_schedule_timezone(conveyor, tz, cron, start):
    zone = ZoneInfo(tz)
    moment = datetime.fromisoformat(start).replace(tzinfo=zone).timestamp()
    row = schedules.Schedule(name="dst", cron=cron, timezone=tz, paused=False, next_run_at=moment)
    expected = croniter(cron, datetime.fromtimestamp(moment, zone))
    assert schedules.upcoming(row, 6, moment) == [expected.get_next(float) for _ in range(6)]


def test_spring_forward_slot_moves_to_the_first_valid_time(conveyor):
    zone = ZoneInfo("Europe/Berlin")
    moment = datetime(2026, 3, 29, 0, 0, tzinfo=zone).timestamp()
    row = schedules.Schedule(name="dst", cron="30 2 * * *", timezone="Europe/Berlin",
                             paused=False, next_run_at=moment)
    first = datetime.fromtimestamp(schedules.upcoming(row, 1, moment)[0], zone)
    assert first.date().isoformat() == "2026-03-29"  # fires that day, after the gap
    assert first.utcoffset().total_seconds() == 7200


@pytest.mark.parametrize("body, complaint", [
    ({"cron": "61 * * * *"}, "cron"),
    ({"cron": "* * * *"}, "cron"),
    ({"cron": "not a cron"}, "cron"),
    ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ({"timezone": "../../etc/passwd"}, "timezone"),
    ({"timezone": "America"}, "timezone"),
    ({"cron": "0 0 30 2 *"}, "cron"),
    ({"cron": "0 0 31 9 *"}, "cron"),
    ({"type": "no.such.type"}, "type"),
    ({"type": "t.schema", "payload": {"to": 5}}, "payload/to"),
    ({"name": "Upper Case"}, "name"),
    ({"overlap": "sometimes"}, "overlap"),
])
def test_invalid_schedules_are_refused_with_the_reason(conveyor, body, complaint):
    full = {"name": "bad", "cron": "* * * * *", "type": "t.noop", **body}
    with pytest.raises(Invalid) as refused:
        schedules.create(full, rules())
    assert any(error.startswith(complaint) for error in refused.value.errors), refused.value.errors
    assert schedules.list_schedules()[0] == []


def test_a_taken_name_is_a_conflict(conveyor):
    schedules.create({"name": "once", "cron": "* * * * *", "type": "t.noop"}, rules())
    with pytest.raises(Conflict):
        schedules.create({"name": "once", "cron": "0 * * * *", "type": "t.noop"}, rules())


def test_schedule_cli_round_trip(conveyor):
    added = conveyor.flask("schedules", "add", "nightly", "--cron", "0 3 * * *", "--type",
                           "t.noop", "--timezone", "Europe/Berlin", "--overlap", "allow")
    assert "next run" in added.stdout
    listed = conveyor.flask("schedules", "list", "--json").stdout
    assert '"nightly"' in listed and '"Europe/Berlin"' in listed
    conveyor.flask("schedules", "pause", "nightly")
    assert schedules.get("nightly").paused
    conveyor.flask("schedules", "resume", "nightly")
    assert not schedules.get("nightly").paused
    shown = conveyor.flask("schedules", "show", "nightly", "--json").stdout
    assert '"next_runs"' in shown
    conveyor.flask("schedules", "remove", "nightly")
    assert schedules.list_schedules()[0] == []


@pytest.mark.parametrize("args, fragment", [
    (["--cron", "99 * * * *", "--type", "t.noop"], "cron"),
    (["--cron", "0 0 30 2 *", "--type", "t.noop"], "never fires"),
    (["--cron", "* * * * *", "--type", "t.noop", "--timezone", "Europe"], "timezone"),
    (["--cron", "* * * * *", "--type", "t.noop", "--timezone", "No/Where"], "timezone"),
    (["--cron", "* * * * *", "--type", "missing.type"], "missing.type"),
    (["--cron", "* * * * *", "--type", "t.noop", "--payload", "[1]"], "JSON object"),
])
def test_schedule_cli_refuses_bad_input_in_one_line(conveyor, args, fragment):
    result = conveyor.flask("schedules", "add", "x", *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and fragment in error_lines[0]


# ---------------------------------------------------------------- real supervisors, real time

def _supervisors(conveyor, count_on_postgres=3, **env):
    count = count_on_postgres if conveyor.is_postgres else 1
    started = [conveyor.start_supervisor(concurrency=2, **env) for _ in range(count)]
    for supervisor in started:
        supervisor.wait_for_workers(2)
    return started


def _settled_runs(name, count, timeout=30):
    return wait_for(lambda: len(runs_of(name)) >= count and runs_of(name), timeout,
                    interval=0.1, message=f"{count} runs of {name}")


@pytest.mark.slow
def test_every_second_schedule_on_several_supervisors_fires_each_slot_once_without_overlap(
        conveyor, effects_log):
    _supervisors(conveyor)
    schedules.create({"name": "per-second", "cron": "* * * * * *", "type": "t.sleep",
                      "payload": {"s": 1.6, "log": effects_log}, "overlap": "skip"}, rules())
    runs = _settled_runs("per-second", 8)
    schedules.set_paused("per-second", True, rules())

    slots = [run.slot for run in runs]
    assert len(slots) == len(set(slots))  # each slot once (the database would refuse a second)
    assert slots == sorted(slots) and all(b - a == 1.0 for a, b in zip(slots, slots[1:])), \
        "a per-second schedule skipped or replayed a slot"
    enqueued = [run.job_id for run in runs if run.outcome == "enqueued"]
    skipped = [run for run in runs if run.outcome == "skipped"]
    assert enqueued and skipped, [(r.outcome, r.reason) for r in runs]
    conveyor.wait_until_final(enqueued)
    assert overlapping_pairs(job_intervals(enqueued)) == []
    assert conveyor.flask("audit").returncode == 0


@pytest.mark.slow
def test_overlap_allow_lets_a_slow_schedule_run_concurrently(conveyor, effects_log):
    _supervisors(conveyor)
    schedules.create({"name": "pile-up", "cron": "* * * * * *", "type": "t.sleep",
                      "payload": {"s": 2.5, "log": effects_log}, "overlap": "allow"}, rules())
    runs = _settled_runs("pile-up", 4)
    schedules.set_paused("pile-up", True, rules())
    assert all(run.outcome == "enqueued" for run in runs)
    enqueued = [run.job_id for run in runs]
    conveyor.wait_until_final(enqueued, timeout=60)
    assert overlapping_pairs(job_intervals(enqueued)), "allow should let runs overlap"


@pytest.mark.slow
def test_supervisor_killed_mid_run_the_run_is_recovered_not_duplicated(conveyor, tmp_path):
    go = tmp_path / "go"
    first = conveyor.start_supervisor(concurrency=1)
    first.wait_for_workers(1)
    schedules.create({"name": "hourly", "cron": "* * * * * *", "type": "t.wait_file",
                      "payload": {"file": str(go)}, "overlap": "skip"}, rules())
    [run] = _settled_runs("hourly", 1)
    job = conveyor.wait_for_status(run.job_id, "running")
    assert conveyor.attempts(job.id)[0].pid in first.worker_pids()

    second = conveyor.start_supervisor(concurrency=1)
    second.wait_for_workers(1)
    first.kill_host()
    go.touch()
    finished = conveyor.wait_for_status(run.job_id, "succeeded", timeout=30)
    schedules.set_paused("hourly", True, rules())

    assert [a.status for a in conveyor.attempts(finished.id)] == ["crashed", "succeeded"]
    runs = runs_of("hourly")
    assert [r.job_id for r in runs if r.slot == run.slot] == [run.job_id]
    enqueued = [r.job_id for r in runs if r.outcome == "enqueued"]
    conveyor.wait_until_final(enqueued)
    assert overlapping_pairs(job_intervals(enqueued)) == []
    assert conveyor.flask("audit").returncode == 0


# ---------------------------------------------------------------- delayed jobs

def test_delayed_job_waits_scheduled_then_starts_within_a_second_of_its_time(conveyor):
    conveyor.start_supervisor(concurrency=1, POLL_INTERVAL_S="0.5").wait_for_workers(1)
    job_id = conveyor.submit("t.noop", delay_s=1.5)
    job = conveyor.job(job_id)
    assert job.status == "scheduled"
    finished = conveyor.wait_for_status(job_id, "succeeded", timeout=10)
    [attempt] = conveyor.attempts(job_id)
    lateness = attempt.started_at - finished.run_at
    assert 0 <= lateness < 1.0, f"started {lateness:.3f}s after its run_at"


def test_run_at_with_an_offset_is_stored_in_utc(conveyor):
    job_id = conveyor.submit("t.noop", run_at="2030-01-01T10:00:00+02:00")
    job = conveyor.job(job_id)
    assert job.run_at == datetime(2030, 1, 1, 8, 0, tzinfo=timezone.utc).timestamp()
    assert job.status == "scheduled"


@pytest.mark.parametrize("fields", [
    {"run_at": "2030-01-01T10:00:00"},               # no offset
    {"run_at": "tomorrow"},
    {"run_at": "2030-01-01T10:00:00Z", "delay_s": 5},
    {"delay_s": -1},
])
def test_bad_run_times_are_refused(conveyor, fields):
    with pytest.raises(Invalid):
        conveyor.submit("t.noop", **fields)
