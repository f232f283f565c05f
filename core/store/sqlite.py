"""The core's statements on SQLite (sqlite.sql). SQLite lives on this host, so its clock
is ours: `now` is time.time() (its own 'now' is cut to the millisecond, so a job stored due
could look not due yet)."""
import json
import time

from models import db
from core.store.queries import load, rows

SQL = load("sqlite.sql")

_compact_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def db_time():
    return time.time()


def insert_jobs(new_jobs, api_key_id):
    """What postgres.insert_jobs does, without NOTIFY (SQLite has none)."""
    given = _compact_json.encode([
        (new.type, new.queue, new.payload_json, new.priority, new.run_at, new.delay_s,
         new.max_attempts, new.timeout_s, new.backoff_base_s, new.backoff_max_s,
         new.idempotency_key, new.request_hash, new.group_key) for new in new_jobs])
    cursor = db.execute_sql(SQL["insert_jobs"], {"jobs": given, "api_key_id": api_key_id,
                                                 "now": time.time()})
    return sorted(rows(cursor), key=lambda row: row["id"])


def step(worker, reports, limit):
    """What postgres.step does, as several statements in one transaction (BEGIN
    IMMEDIATE: the write lock first, so no lock upgrade can fail)."""
    if not reports and not _any_due(worker, time.time()):
        return [], {}, set()  # spare SQLite's single write lock when there is nothing to take
    claimed, moved, refused = [], {}, set()
    with db.atomic():
        now = time.time()
        for report in reports:
            values = {**report, "now": now}
            found = rows(db.execute_sql(SQL["move"], values))
            if found:
                ended = rows(db.execute_sql(SQL["end_attempt"], values))
                moved[report["id"]] = {**found[0],
                                       "duration_s": ended[0]["duration_s"] if ended else None}
            elif report["fence"] and db.execute_sql(SQL["fence"], values).fetchone():
                refused.add(report["id"])
        if limit:
            claimed = rows(db.execute_sql(*claim_statement(worker, limit, now)))
            if claimed:
                db.execute_sql(SQL["start_attempts"], {
                    "claimed": _compact_json.encode([(job["id"], job["attempt"]) for job in claimed]),
                    "worker_id": worker.id, "host": worker.host, "pid": worker.pid, "now": now})
    return claimed, moved, refused


def claim_statement(worker, limit, now=None):
    """(sql, params): the statement a claim of `limit` jobs for `worker` runs."""
    now = time.time() if now is None else now
    if len(worker.queues) == 1:
        return SQL["claim_from_queue"], {"worker_id": worker.id, "now": now,
                                         "queue": worker.queues[0], "limit": limit}
    return SQL["claim"], {"worker_id": worker.id, "now": now, "limit": limit,
                          "queues": json.dumps(list(worker.queues)) if worker.queues else None}


def _any_due(worker, now):
    if worker and len(worker.queues) == 1:
        due = db.execute_sql(SQL["any_due_in_queue"], {"now": now, "queue": worker.queues[0]})
    else:
        queues = json.dumps(list(worker.queues)) if worker and worker.queues else None
        due = db.execute_sql(SQL["any_due"], {"now": now, "queues": queues})
    return bool(rows(due)[0]["due"])


def stale_claim(owner, lease_s):
    """The running jobs of `owner` whose heartbeat is older than lease_s (the caller's
    transaction holds the write lock)."""
    return rows(db.execute_sql(SQL["stale_claim"], {"owner": owner, "lease_s": lease_s,
                                                    "now": time.time()}))


def notify(counts):
    """SQLite has no NOTIFY: its workers poll."""
