"""Recurring schedules: create, change, pause, and fire them.

Any number of supervisors call `fire_due`. A due slot is enqueued exactly once because
the first process to insert its (schedule, slot) row wins; the others find the row and
move on. With overlap "skip", a slot whose previous run is unfinished is recorded as
skipped. After downtime only the latest missed slot fires. Slots come from croniter in
the schedule's timezone, so DST transitions follow croniter's rules.
"""
import re
from datetime import datetime, timezone as utc_zone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import peewee as pw
from croniter import CroniterBadDateError, croniter
from jsonschema import Draft202012Validator

from core import jobs

from core import history

from core import status as statuses

from core import submission
from core.errors import Conflict, Invalid, InvalidRequest, InvalidSchedule, NotFound, Refused
from models import Job, Schedule, ScheduleRun, db, now

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$(?!\n)"  # see submission.NAME_PATTERN
MAX_LIMIT = history.MAX_LIMIT

CRON_FORMAT = ("5 fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *'. An "
               "optional 6th field for seconds goes LAST, as croniter reads it: "
               "'*/5 * * * * 30' fires at second 30 of every fifth minute.")
_FIELDS = {
    "cron": {"type": "string", "minLength": 1, "maxLength": 200, "description": CRON_FORMAT},
    "type": {"type": "string", "minLength": 1, "maxLength": 100},
    "payload": {"type": "object"},
    "queue": {"type": ["string", "null"], "pattern": submission.NAME_PATTERN},
    "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
    "timezone": {"type": "string", "minLength": 1, "maxLength": 64},
    "overlap": {"enum": ["skip", "allow"]},
    "paused": {"type": "boolean"},
}
SCHEDULE_SCHEMA = {
    "type": "object", "required": ["name", "cron", "type"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": NAME_PATTERN}, **_FIELDS},
}
CHANGE_SCHEMA = {"type": "object", "additionalProperties": False, "minProperties": 1,
                 "properties": _FIELDS}


# ---------------------------------------------------------------------------- slots

def is_name(value):
    return isinstance(value, str) and re.fullmatch(NAME_PATTERN, value) is not None


def zone(name):
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):  # OSError: "America"
        raise InvalidSchedule(f"unknown timezone {name!r}",
                              [f"timezone: {name!r} is not an IANA timezone"]) from None


def check_cron(expression):
    """5 fields (a 6th for seconds, and @hourly-style aliases, as croniter allows)."""
    fields = expression.split()
    aliased = len(fields) == 1 and expression.startswith("@")
    if not (aliased or len(fields) in (5, 6)) or not croniter.is_valid(expression):
        raise InvalidSchedule(f"{expression!r} is not a valid cron expression",
                              [f"cron: expected 5 fields (minute hour day-of-month month "
                               f"day-of-week) with valid values, got {expression!r}"])


def _slots(schedule, start):
    return croniter(schedule.cron, datetime.fromtimestamp(start, zone(schedule.timezone)))


def next_after(schedule, moment):
    """The first slot strictly after moment (epoch seconds)."""
    return _slots(schedule, moment).get_next(float)


def first_slot(schedule, moment):
    """next_after for a cron being saved. croniter finds that a valid expression matches
    no date at all (30 February) only by searching for one, so it is refused here."""
    try:
        return next_after(schedule, moment)
    except CroniterBadDateError:
        raise InvalidSchedule(f"the cron {schedule.cron!r} never fires",
                              [f"cron: no date matches {schedule.cron!r}"]) from None


def latest_at_or_before(schedule, moment):
    # croniter's get_prev is strict; a microsecond later makes a slot at `moment` count.
    return _slots(schedule, moment + 1e-6).get_prev(float)


def upcoming(schedule, count=5, moment=None):
    """The next count slots (none while paused: a resume starts from the slot after it)."""
    if schedule.paused:
        return []
    iterator = _slots(schedule, max(moment or jobs.db_time(), schedule.next_run_at - 1e-6))
    return [iterator.get_next(float) for _ in range(count)]


# ---------------------------------------------------------------------------- changes

def _validate(body, schema):
    if not isinstance(body, dict):
        raise InvalidSchedule("a schedule must be a JSON object",
                              ["(schedule): must be an object"])
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(schedule)'}: {e.message}"
              for e in Draft202012Validator(schema).iter_errors(body)]
    if errors:
        raise InvalidSchedule("the schedule is not valid", errors)


def _check_job(fields, rules):
    """The job each slot will enqueue must be valid now: type, payload, queue, priority."""
    body = {"type": fields["type"], "payload": fields.get("payload") or {}}
    for name in ("queue", "priority"):
        if fields.get(name) is not None:
            body[name] = fields[name]
    try:
        submission.validate_submission(body, rules)
    except Invalid as exc:  # what was sent is a schedule: it is the schedule that is invalid
        raise InvalidSchedule(exc.detail, exc.errors) from None


def create(body, rules):
    _validate(body, SCHEDULE_SCHEMA)
    check_cron(body["cron"])
    zone(body.get("timezone", "UTC"))
    _check_job(body, rules)
    current = jobs.db_time()
    fields = {"payload": {}, "timezone": "UTC", "overlap": "skip", "paused": False, "priority": 0,
              **body, "created_at": current, "updated_at": current}
    fields["next_run_at"] = first_slot(Schedule(**fields), current)
    inserted = list(Schedule.insert(fields).on_conflict(action="NOTHING")
                    .returning(Schedule.name).execute())
    if not inserted:
        raise Conflict(f"a schedule named {body['name']!r} already exists")
    return get(body["name"])


def update(name, changes, rules):
    """Change a schedule; a new cron, timezone or a resume recomputes its next slot."""
    _validate(changes, CHANGE_SCHEMA)
    schedule = get(name)
    merged = {field: getattr(schedule, field) for field in _FIELDS} | changes
    check_cron(merged["cron"])
    zone(merged["timezone"])
    _check_job(merged, rules)
    current = jobs.db_time()
    fields = dict(changes, updated_at=current)
    retimed = {"cron", "timezone"} & changes.keys() or (schedule.paused and not merged["paused"])
    if retimed:
        fields["next_run_at"] = first_slot(Schedule(**merged), current)
    if not Schedule.update(fields).where(Schedule.name == name).execute():
        raise NotFound(f"schedule {name!r} not found")
    return get(name)


def set_paused(name, paused, rules):
    return update(name, {"paused": paused}, rules)


def remove(name):
    get(name)
    with db.atomic():
        ScheduleRun.delete().where(ScheduleRun.schedule_name == name).execute()
        if not Schedule.delete().where(Schedule.name == name).execute():
            raise NotFound(f"schedule {name!r} not found")


def get(name):
    schedule = Schedule.get_or_none(Schedule.name == name) if is_name(name) else None
    if schedule is None:
        raise NotFound(f"schedule {name!r} not found")
    return schedule


def list_schedules(limit=50, cursor=None):
    """A page of schedules by name: (schedules, next_cursor or None)."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}",
                             ["limit: out of range"])
    query = Schedule.select().order_by(Schedule.name)
    if cursor:
        after = history.decode_cursor(cursor, issued=is_name)
        query = query.where(Schedule.name > after)
    page = list(query.limit(limit + 1))
    next_cursor = history.encode_cursor(page[limit - 1].name) if len(page) > limit else None
    return page[:limit], next_cursor


def recent_runs(name, limit=20):
    """The latest runs of a schedule with the status of each run's job (None if pruned)."""
    rows = (ScheduleRun.select(ScheduleRun, Job.status.alias("job_status"))
            .join(Job, pw.JOIN.LEFT_OUTER, on=(Job.id == ScheduleRun.job_id))
            .where(ScheduleRun.schedule_name == name)
            .order_by(ScheduleRun.slot.desc()).limit(limit).objects())
    return list(rows)


# ---------------------------------------------------------------------------- firing

def fire_due(moment=None, *, rules):
    """Enqueue the latest due slot of every due schedule, as `rules` (core.submission.Rules)
    check and complete a job; returns the runs this call made."""
    moment = jobs.db_time() if moment is None else moment
    due = (Schedule.select()
           .where(Schedule.paused == False, Schedule.next_run_at <= moment)  # noqa: E712
           .order_by(Schedule.next_run_at).limit(100))
    fired = []
    for schedule in due:
        run = _fire(schedule, latest_at_or_before(schedule, moment), rules)
        if run is not None:
            fired.append(run)
    return fired


def _fire(schedule, slot, rules):
    with db.atomic():
        claimed = list(ScheduleRun.insert(schedule_name=schedule.name, slot=slot,
                                          outcome="enqueued", created_at=now())
                       .on_conflict(action="NOTHING").returning(ScheduleRun.id).execute())
        upcoming_slot = next_after(schedule, slot)
        (Schedule.update(next_run_at=upcoming_slot)
         .where(Schedule.name == schedule.name, Schedule.next_run_at < upcoming_slot).execute())
        if not claimed:
            return None  # another supervisor fired this slot
        outcome, job_id, reason = "enqueued", None, None
        busy = _unfinished_run(schedule.name, slot) if schedule.overlap == "skip" else None
        if busy is not None:
            outcome = "skipped"
            reason = f"the previous run (job {busy.job_id}) is still {busy.job_status}"
        else:
            try:
                job_id = _enqueue(schedule, slot, rules)
            except Refused as exc:
                outcome, reason = "failed", exc.detail
        (ScheduleRun.update(outcome=outcome, job_id=job_id, reason=reason)
         .where(ScheduleRun.id == claimed[0].id).execute())
        return ScheduleRun.get_by_id(claimed[0].id)


def _unfinished_run(name, slot):
    previous = (ScheduleRun.select(ScheduleRun.job_id, Job.status.alias("job_status"))
                .join(Job, on=(Job.id == ScheduleRun.job_id))
                .where(ScheduleRun.schedule_name == name, ScheduleRun.outcome == "enqueued",
                       ScheduleRun.slot < slot)
                .order_by(ScheduleRun.slot.desc()).limit(1).objects().first())
    if previous is not None and previous.job_status not in statuses.FINAL:
        return previous
    return None


def _enqueue(schedule, slot, rules):
    body = {"type": schedule.type, "payload": schedule.payload, "priority": schedule.priority}
    if schedule.queue:
        body["queue"] = schedule.queue
    slot_text = datetime.fromtimestamp(slot, utc_zone.utc).isoformat().replace("+00:00", "Z")
    new = submission.validate_submission(body, rules,
                                         idempotency_key=f"schedule:{schedule.name}:{slot_text}")
    [(job, _)] = jobs.enqueue([new])
    return job.id


def prune_runs(older_than_s):
    """Forget runs older than the cutoff, except each schedule's latest enqueued run (the
    one overlap "skip" looks at)."""
    latest = (ScheduleRun.select(pw.fn.MAX(ScheduleRun.id))
              .where(ScheduleRun.outcome == "enqueued").group_by(ScheduleRun.schedule_name))
    return (ScheduleRun.delete()
            .where(ScheduleRun.created_at < jobs.db_time() - older_than_s,
                   ScheduleRun.id.not_in(latest)).execute())

