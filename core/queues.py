"""Queue settings (SPEC §11): pause a queue, cap its running attempts, limit how fast its
attempts start; and every known queue with its jobs by status.

A queue's settings are its row of `queues`, written here and read by every claim
(core/store), so a change takes effect on every host at the next claim. A rate is written
N/second, N/minute or N/hour, here and in a handler's `rate=` option (parse_rate).
"""
import logging
import re
from typing import NamedTuple, Optional

from jsonschema import Draft202012Validator

from core import history
from core.errors import InvalidRequest, InvalidSetting
from handlers.rates import MAX_COUNT, RATE_FORMAT, RATE_PATTERN, Rate, parse_rate as read_rate
from core.submission import NAME_PATTERN
from models import QueueSetting, now

log = logging.getLogger("conveyor.queues")

CHANGE_SCHEMA = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "paused": {"type": "boolean",
                   "description": "true: no attempt of the queue starts (running ones "
                                  "finish); false: its jobs run again."},
        "concurrency": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_COUNT,
                        "description": "At most this many attempts of the queue running at "
                                       "once; null clears the limit."},
        "rate": {"type": ["string", "null"], "pattern": RATE_PATTERN,
                 "description": f"At most N attempts of the queue start in any interval of "
                                f"that length ({RATE_FORMAT}); null clears the limit."},
    },
}
_change_validator = Draft202012Validator(CHANGE_SCHEMA)


class Queue(NamedTuple):
    """A queue as an operator sees it: its jobs by status (statuses without jobs left out,
    as in history.stats) and its settings. A queue nobody has set is not paused, has no
    limits and no updated_at."""
    name: str
    counts: dict
    paused: bool = False
    concurrency: Optional[int] = None
    rate: Optional[str] = None
    updated_at: Optional[float] = None


# ---------------------------------------------------------------------------- rates

def parse_rate(text, field="rate"):
    """(count, period_s) of a rate (handlers.rates); InvalidSetting naming `field`."""
    try:
        return read_rate(text)
    except ValueError:
        raise InvalidSetting(f"{field} must be {RATE_FORMAT}",
                             [f"{field}: {text!r} is not {RATE_FORMAT}"]) from None


def format_rate(count, period_s):
    """A rate as parse_rate reads it: (10, 60.0) is "10/minute"."""
    return str(Rate(count, period_s))


# ---------------------------------------------------------------------------- queues

def list_queues():
    """Every known queue, by name: those with jobs (of any status) and those with settings."""
    counts = history.counts_by_queue()
    settings = {row.name: row for row in QueueSetting.select()}
    return [_queue(name, counts.get(name, {}), settings.get(name))
            for name in sorted(counts.keys() | settings.keys())]


def update_queue(name, changes):
    """Change the settings `changes` names (paused, concurrency, rate; null clears a limit),
    making the queue's row if it has none; returns the queue. InvalidSetting names each bad
    field; a name that is no queue's (core.submission.NAME_PATTERN) is InvalidRequest."""
    _check_name(name)
    _validate(changes)
    columns = {QueueSetting.updated_at: now()}
    if "paused" in changes:
        columns[QueueSetting.paused] = changes["paused"]
    if "concurrency" in changes:
        concurrency = changes["concurrency"]
        columns[QueueSetting.concurrency] = None if concurrency is None else int(concurrency)
    if "rate" in changes:
        count, period_s = (None, None) if changes["rate"] is None else parse_rate(changes["rate"])
        columns.update({QueueSetting.rate_count: count, QueueSetting.rate_period_s: period_s})
    (QueueSetting.insert({QueueSetting.name: name, **columns})
     .on_conflict(conflict_target=[QueueSetting.name], update=columns).execute())
    queue = _read(name)
    log.info("queue %s: %s", name, ", ".join(_described(changes, queue)))
    return queue


def pause(name):
    """Start no attempt of the queue's jobs until it is resumed (running ones finish)."""
    return update_queue(name, {"paused": True})


def resume(name):
    """Let the queue's jobs start again."""
    return update_queue(name, {"paused": False})


def _check_name(name):
    if not (isinstance(name, str) and re.match(NAME_PATTERN, name)):
        raise InvalidRequest(f"{name!r} is not a queue name",
                             ["name: 1 to 100 letters, digits and _.:- starting with a "
                              "letter or digit"])


def _validate(changes):
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(queue)'}: {_reason(e)}"
              for e in _change_validator.iter_errors(changes)]
    if errors:
        raise InvalidSetting("the queue settings are not valid: send one or more of paused "
                             "(true or false), concurrency and rate (null clears a limit)",
                             errors)


def _reason(error):
    # jsonschema would quote RATE_PATTERN back; say what a rate looks like instead.
    if error.validator == "pattern":
        return f"{error.instance!r} is not {RATE_FORMAT}"
    return error.message


def _read(name):
    setting = QueueSetting.get_or_none(QueueSetting.name == name)
    return _queue(name, history.counts_by_queue(name).get(name, {}), setting)


def _queue(name, counts, setting):
    if setting is None:
        return Queue(name, counts)
    rate = (None if setting.rate_count is None
            else format_rate(setting.rate_count, setting.rate_period_s))
    return Queue(name, counts, bool(setting.paused), setting.concurrency, rate,
                 setting.updated_at)


def _described(changes, queue):
    """What a change did, a few words a setting in a fixed order, for the log."""
    for field in [field for field in CHANGE_SCHEMA["properties"] if field in changes]:
        if field == "paused":
            yield "paused" if queue.paused else "resumed"
        else:
            value = getattr(queue, field)
            yield f"{field} {'cleared' if value is None else value}"
