"""The core's statements on SQLite (sqlite.sql). SQLite lives on this host, so its clock
is ours: `now` is time.time() (its own 'now' is cut to the millisecond, so a job stored due
could look not due yet)."""
import json
import time
from typing import NamedTuple, Optional

from models import db
from core.store.queries import compact_json, load, named_rows, new_jobs_json, rows

SQL = load("sqlite.sql")

def db_time():
    return time.time()


def take_callbacks(lease, limit, lease_s):
    """What postgres.take_callbacks does (the caller's transaction holds the write lock)."""
    return rows(db.execute_sql(SQL["take_callbacks"], {"lease": lease, "limit": limit,
                                                       "lease_s": lease_s, "now": time.time()}))


def insert_jobs(new_jobs, api_key_id, limited_types, announce=False):
    """What postgres.insert_jobs does, without NOTIFY (SQLite has none: announce is moot)."""
    cursor = db.execute_sql(SQL["insert_jobs"], {"jobs": new_jobs_json(new_jobs),
                                                 "api_key_id": api_key_id,
                                                 "limited_types": json.dumps(list(limited_types)),
                                                 "now": time.time()})
    return sorted(named_rows(cursor), key=lambda row: row.id)


def step(worker, reports, limit, turns=None, limits=None, guard=0.0):
    """What postgres.step does, as several statements in one transaction (BEGIN
    IMMEDIATE: the write lock first, so no lock upgrade can fail)."""
    if not reports and not _any_due(worker, time.time(), limits is not None):
        return [], [], {}, set()  # spare SQLite's single write lock when there is nothing to take
    claimed, limited, moved, refused = [], [], {}, set()
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
            due = turns[:limit] if turns is not None else [
                row["id"] for row in rows(db.execute_sql(*claim_statement(worker, limit, now)))]
            claimed = _start(worker, due, now)
            if limits is not None and len(claimed) < limit:
                limited = _claim_limited(worker, limits, guard, limit - len(claimed), now)
    return claimed, limited, moved, refused


def _start(worker, job_ids, now):
    """Start these jobs for worker (those still waiting), with their attempt rows."""
    if not job_ids:
        return []
    claimed = rows(db.execute_sql(SQL["claim_ids"], {
        "ids": json.dumps(job_ids), "worker_id": worker.id, "now": now}))
    if claimed:
        db.execute_sql(SQL["start_attempts"], {
            "claimed": compact_json.encode([(job["id"], job["attempt"]) for job in claimed]),
            "worker_id": worker.id, "host": worker.host, "pid": worker.pid, "now": now})
    return claimed


def claim_statement(worker, limit, now=None):
    """(sql, params): the statement through which a claim of `limit` jobs for `worker`
    finds them (claim_ids then starts them)."""
    now = time.time() if now is None else now
    if len(worker.queues) == 1:
        return SQL["due_in_queue"], {"now": now, "limit": limit, "queue": worker.queues[0]}
    return SQL["due"], {"now": now, "limit": limit, "queues": _queues(worker)}


def _queues(worker):
    return json.dumps(list(worker.queues)) if worker and worker.queues else None


def _any_due(worker, now, limited):
    """Whether a due job waits for worker: one under no limit, or, when `limited`, one
    under limits (held) too."""
    if worker and len(worker.queues) == 1:
        due = db.execute_sql(SQL["any_due_in_queue"], {"now": now, "queue": worker.queues[0]})
    else:
        due = db.execute_sql(SQL["any_due"], {"now": now, "queues": _queues(worker)})
    if rows(due)[0]["due"]:
        return True
    return limited and bool(rows(db.execute_sql(SQL["any_held_due"], {"now": now}))[0]["due"])


def turns(worker, limit):
    """What postgres.turns answers: the lanes found one seek at a time (next_lane), each
    lane's oldest `limit` due jobs (lane_jobs), taken by turns."""
    held = {row["name"] for row in rows(db.execute_sql(SQL["held_queues"]))}
    lanes, lane = [], {"queue": "", "priority": -2 ** 63, "owner": -1}  # before every lane
    while True:
        found = rows(db.execute_sql(SQL["next_lane"], {**lane, "queues": _queues(worker)}))
        if not found:
            break
        lane = found[0]
        if lane["queue"] not in held:
            lanes.append(lane)
    now, waiting = time.time(), []
    for lane in lanes:
        due = rows(db.execute_sql(SQL["lane_jobs"], {**lane, "now": now, "limit": limit}))
        waiting += [((lane["priority"], turn, job["running"], job["run_at"], job["id"]),
                     {"id": job["id"], **lane}) for turn, job in enumerate(due)]
    return [chosen for _, chosen in sorted(waiting, key=lambda pair: pair[0])[:limit * 4]]


def _claim_limited(worker, limits, guard, limit, now):
    """What conveyor_claim_limited does on PostgreSQL (migrations/0010_places_hold_claims.py),
    in the step's transaction: under BEGIN IMMEDIATE this process is the only writer, so
    its counts are exact. A concurrency limit counts the claims running under it (a worker
    runs the jobs of one claim one after another)."""
    passed = set()  # limits found full: their other jobs wait too
    for job in _candidates(worker, now):
        over = limits_over(job, limits.get(job["type"], {}))
        room = {rule: _room(rule, job, now, guard) for rule in over if rule.key not in passed}
        full = next((rule for rule in over if room.get(rule, 0) <= 0), None)
        if full is not None:
            passed.add(full.key)
            continue
        # The jobs that share its limits, under the same places, as many as its rates
        # allow to start now (a start is counted when it is claimed).
        alike = [row["id"] for row in rows(db.execute_sql(SQL["alike"], {
            "type": job["type"], "queue": job["queue"], "group_key": job["group_key"],
            "now": now, "limit": min([limit, *room.values()])}))]
        claimed = _start(worker, alike, now)
        if not claimed:
            continue
        for rule in over:
            if rule.rate_count is not None:
                since = now - rule.rate_period_s * (1 + guard)
                db.execute_sql(SQL["forget_starts"], {"key": rule.key, "since": since})
                db.execute_sql(SQL["record_starts"], {"key": rule.key, "now": now,
                                                      "count": len(claimed)})
        return sorted(claimed, key=lambda row: (row["priority"], row["run_at"], row["id"]))
    return []


def _candidates(worker, now, pages=10):
    """The due jobs under limits, in the order they are taken, read a page at a time (the
    first page mostly decides), as far as PostgreSQL's claim looks (1,000)."""
    for page in range(pages):
        found = rows(db.execute_sql(SQL["limited_candidates"], {
            "now": now, "queues": _queues(worker), "offset": page * 100}))
        yield from found
        if len(found) < 100:
            return


class Limit(NamedTuple):
    key: str  # what counts under it: type:T, group:T:G, queue:Q
    kind: str
    concurrency: Optional[int]
    rate_count: Optional[int]
    rate_period_s: Optional[float]


def limits_over(job, type_limits):
    """The limits a candidate job (a row of limited_candidates) is under: its type's, its
    (type, group)'s, its queue's."""
    rate = type_limits.get("rate") or (None, None)
    over = [Limit(f"type:{job['type']}", "type", type_limits.get("concurrency"), *rate),
            Limit(f"queue:{job['queue']}", "queue", job["queue_concurrency"],
                  job["queue_rate_count"], job["queue_rate_period_s"])]
    if job["group_key"] is not None:
        over.append(Limit(f"group:{job['type']}:{job['group_key']}", "group",
                          type_limits.get("group_concurrency"), None, None))
    return [limit for limit in over
            if limit.concurrency is not None or limit.rate_count is not None]


_RUNNING = {"type": "running_of_type", "group": "running_of_group", "queue": "running_of_queue"}


def _room(limit, job, now, guard):
    """How many jobs a claim may take under `limit` now: a concurrency limit's claims
    take one place whatever their size (so any number, or none when its places are all
    taken); a rate allows as many as it has starts left."""
    room = float("inf")
    if limit.concurrency is not None:
        running = rows(db.execute_sql(SQL[_RUNNING[limit.kind]], job))[0]["running"]
        if running >= limit.concurrency:
            return 0
    if limit.rate_count is not None:
        since = now - limit.rate_period_s * (1 + guard)
        started = rows(db.execute_sql(SQL["starts_since"], {"key": limit.key, "since": since}))
        room = limit.rate_count - started[0]["started"]
    return room


def stale_claim(owner, lease_s):
    """The running jobs of `owner` whose heartbeat is older than lease_s (the caller's
    transaction holds the write lock)."""
    return rows(db.execute_sql(SQL["stale_claim"], {"owner": owner, "lease_s": lease_s,
                                                    "now": time.time()}))


def job_counts(queue=None):
    """What postgres.job_counts answers, counted in the table itself."""
    return rows(db.execute_sql(SQL["job_counts"], {"queue": queue}))


def fold_counts():
    """SQLite keeps no counts (see postgres.sql)."""


def miscounted():
    return []


def notify(counts):
    """SQLite has no NOTIFY: its workers poll."""
