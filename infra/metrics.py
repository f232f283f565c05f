"""The metrics sink: counters the core, the workers and the web count into, correct across
every process on every host.

Counters (jobs submitted, succeeded, failed, dead, cancelled, reaped; attempt durations;
rate-limit refusals) are counted where the event happens, into this process's memory,
and flushed every few seconds into `metric_counters`: each process adds to its own rows,
so no two processes contend on a row, and a scrape sums the rows of all of them
(`totals`). This module imports nothing of ours but the models, so anything may count;
GET /metrics is rendered on the web side (web/exposition.py).
"""
import atexit
import json
import os
import socket
import threading
import uuid

import peewee as pw

from models import DB_ERRORS, MetricCounter, db, now, reset_connection

RETIRED = "retired"  # the process id that absorbs the counts of long-gone processes

COUNTERS = {
    "conveyor_jobs_submitted": ("Jobs stored.", ("type", "queue")),
    "conveyor_jobs_succeeded": ("Jobs whose attempt succeeded.", ("type", "queue")),
    "conveyor_attempts_failed": ("Attempts that ended without success, by how they ended "
                                 "(failed, timed_out, crashed, interrupted).",
                                 ("type", "queue", "outcome")),
    "conveyor_jobs_dead": ("Jobs sent to the dead-letter queue.", ("type", "queue", "reason")),
    "conveyor_jobs_cancelled": ("Jobs cancelled, dead jobs discarded from the dead-letter "
                                "queue included.", ("type", "queue")),
    "conveyor_attempts_reaped": ("Attempts recorded crashed because their lease expired.",
                                 ("type", "queue")),
    "conveyor_attempts_released": ("Claimed attempts given back unstarted (their worker died "
                                   "or left first); they do not count.", ("type", "queue")),
    "conveyor_callbacks_delivered": ("Job callbacks delivered (the receiver answered 2xx), "
                                     "by job type.", ("type",)),
    "conveyor_callbacks_failed": ("Job callbacks given up (a refused address, or no 2xx "
                                  "within 24 h of the job's end), by job type.", ("type",)),
    "conveyor_progress_writes": ("Progress values (ctx.progress) written to the database; a "
                                 "handler's reports are coalesced to about one a second.",
                                 ("type", "queue")),
    "conveyor_rate_limited": ("Requests refused with 429, by which limit.", ("limit",)),
    "conveyor_rate_limit_storage_errors": (
        "Requests that found the rate-limit storage unreachable, by what became of them "
        "(refused with 503, or let_through uncounted: RATE_LIMIT_ON_STORAGE_ERROR).",
        ("outcome",)),
}
DURATION = "conveyor_attempt_duration_seconds"
DURATION_LABELS = ("type", "queue")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
           900.0, 3600.0)

_lock = threading.Lock()
_pending = {}      # (name, labels tuple) -> increment not yet flushed
_identity = {}     # pid -> this process's id in metric_counters
_flusher = {}      # pid -> the flushing thread of web processes


def count(name, value=1.0, **labels):
    """Add value to a counter of COUNTERS, in this process (flush() stores it)."""
    key = (name, tuple(labels[label] for label in COUNTERS[name][1]))
    with _lock:
        _pending[key] = _pending.get(key, 0.0) + value


def observe_duration(seconds, **labels):
    """Record one attempt's duration in the histogram (cumulative buckets, sum, count)."""
    values = tuple(labels[label] for label in DURATION_LABELS)
    with _lock:
        for bound in BUCKETS:
            if seconds <= bound:
                key = (f"{DURATION}_bucket", values + (repr(bound),))
                _pending[key] = _pending.get(key, 0.0) + 1
        for suffix, value in (("_bucket", 1.0), ("_sum", seconds), ("_count", 1.0)):
            key = (f"{DURATION}{suffix}", values + (("+Inf",) if suffix == "_bucket" else ()))
            _pending[key] = _pending.get(key, 0.0) + value


def reset():
    """Forget counts not yet flushed: a forked child must not flush its parent's again."""
    with _lock:
        _pending.clear()


def process_id():
    """This process's identity in metric_counters (a new one after a fork)."""
    pid = os.getpid()
    if pid not in _identity:
        _identity[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _identity[pid]


def flush():
    """Store what this process counted since the last flush; on a database error the
    counts are kept for the next flush and the error is raised."""
    with _lock:
        pending = dict(_pending)
        _pending.clear()
    if not pending:
        return
    me = process_id()
    rows = [{"process_id": me, "name": name, "labels": json.dumps(labels), "value": value,
             "updated_at": now()} for (name, labels), value in pending.items()]
    try:
        with db.atomic():
            for start in range(0, len(rows), 200):
                _add(rows[start:start + 200])
    except BaseException:
        with _lock:
            for key, value in pending.items():
                _pending[key] = _pending.get(key, 0.0) + value
        raise


def _add(rows):
    (MetricCounter.insert_many(rows)
     .on_conflict(conflict_target=[MetricCounter.process_id, MetricCounter.name,
                                   MetricCounter.labels],
                  update={MetricCounter.value: MetricCounter.value + pw.EXCLUDED.value,
                          MetricCounter.updated_at: pw.EXCLUDED.updated_at})
     .execute())


def flush_in_background(interval_s):
    """For web processes (gunicorn.conf.py starts it in each worker): flush every
    interval_s from a daemon thread, and at exit. Never in the supervisor, which must stay
    single-threaded to fork safely."""
    pid = os.getpid()
    if pid in _flusher:
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(interval_s):
            flush_quietly()

    _flusher[pid] = threading.Thread(target=loop, name="metrics-flush", daemon=True)
    _flusher[pid].start()
    atexit.register(flush_quietly)


def flush_quietly():
    """flush(), keeping the counts for later when the database does not answer."""
    try:
        flush()
    except DB_ERRORS:
        reset_connection()  # kept for the next flush


def retire_stale(older_than_s):
    """Fold the rows of processes silent for older_than_s into RETIRED, keeping every sum."""
    with db.atomic():
        gone = list(MetricCounter.delete()
                    .where(MetricCounter.process_id != RETIRED,
                           MetricCounter.updated_at < now() - older_than_s)
                    .returning(MetricCounter.name, MetricCounter.labels, MetricCounter.value)
                    .execute())
        totals = {}
        for row in gone:
            totals[(row.name, row.labels)] = totals.get((row.name, row.labels), 0.0) + row.value
        rows = [{"process_id": RETIRED, "name": name, "labels": labels, "value": value,
                 "updated_at": now()} for (name, labels), value in totals.items()]
        for start in range(0, len(rows), 200):
            _add(rows[start:start + 200])
    return len(gone)


def totals():
    """Every counter's value summed over all processes: {name: [(labels, total), ...]},
    labels a tuple in the order of COUNTERS (or of DURATION_LABELS and the bucket bound)."""
    sums = (MetricCounter.select(MetricCounter.name, MetricCounter.labels,
                                 pw.fn.SUM(MetricCounter.value).alias("total"))
            .group_by(MetricCounter.name, MetricCounter.labels).tuples())
    series = {}
    for name, labels, total in sums:
        series.setdefault(name, []).append((tuple(json.loads(labels)), total))
    return series
