"""Flow control (SPEC §11): which limits a claim must respect. The job types' limits come
from their handlers (`@handler(concurrency=, rate=, group_concurrency=)`), a queue's from
its settings (core/queues.py); the claims of core/store enforce them."""
import time

import handlers
from models import QueueSetting

# A rate counts the starts of its period and a tenth more: a claimed job's handler begins
# some milliseconds after its claim (more on a loaded host), and the starts the handlers
# see must keep within the rate. A rate of 20/second runs at about 18 a second.
RATE_GUARD = 0.1

# How long a process trusts what it read of the queues' limits (SPEC §11: settings take
# effect on every host within 2 s).
QUEUE_LIMITS_TTL_S = 1.0
_queue_limits = {"checked_at": float("-inf"), "any": False}


# How long a process trusts what it found of the lanes (fair share): a worker looks again,
# four times a second at most, whether more than one (queue, priority, API key) waits.
LANES_TTL_S = 0.25
_lanes = {}  # the worker's queues -> (checked at, several lanes wait)


def several_lanes(worker, backend):
    """Whether jobs of more than one lane (queue, priority, API key) wait for `worker`'s
    queues: only then does its claim take them by turns, which costs a statement more."""
    current = time.monotonic()
    checked_at, several = _lanes.get(worker.queues, (float("-inf"), False))
    if current - checked_at >= LANES_TTL_S:
        found = {(row["queue"], row["priority"], row["owner"]) for row in backend.turns(worker, 1)}
        several = len(found) > 1
        _lanes[worker.queues] = (current, several)
    return several


def starts_too_late(job, waited_s):
    """Whether a claimed job of a rate-limited type would begin too long after its claim
    (waited_s since the claim was asked for): a rate counts claims over its period and
    RATE_GUARD of it more, so a handler that begins within that guard of its claim keeps
    the starts within the rate; a later one is given back instead (its attempt released,
    not counted) and claimed again when the rate allows."""
    entry = handlers.get(job.type)
    return entry is not None and entry.rate is not None \
        and waited_s > RATE_GUARD * entry.rate.period_s


def type_limits():
    """{type: {"concurrency", "rate": [count, period_s], "group_concurrency"}} for the job
    types with limits, as the claims read them."""
    return {entry.name: {"concurrency": entry.concurrency,
                         "rate": list(entry.rate) if entry.rate else None,
                         "group_concurrency": entry.group_concurrency}
            for entry in handlers.registered().values() if entry.limited}


def queue_limits_exist(ahead_s=0.0):
    """Whether any queue has a concurrency or a rate (read at most once a second). With
    ahead_s, read again now if what was read would be too old within ahead_s: a worker
    about to sleep reads it then, so that its claim when it wakes need not."""
    current = time.monotonic()
    if current + ahead_s - _queue_limits["checked_at"] >= QUEUE_LIMITS_TTL_S:
        _queue_limits["any"] = QueueSetting.select().where(
            QueueSetting.concurrency.is_null(False) | QueueSetting.rate_count.is_null(False)
        ).exists()
        _queue_limits["checked_at"] = current
    return _queue_limits["any"]
