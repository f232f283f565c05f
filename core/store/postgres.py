"""The core's statements on PostgreSQL (postgres.sql), run prepared (models.execute)."""
import logging

import models
from core.store.queries import compact_json, load, named_rows, new_jobs_json, rows

log = logging.getLogger("conveyor.store")

SQL = load("postgres.sql")

# On PostgreSQL, stored jobs that can run now are announced on this channel once they are
# committed (notify); each supervisor LISTENs and wakes that many workers.
NOTIFY_CHANNEL = "conveyor_jobs"


def notify_payload(queue, count):
    """What a NOTIFY on NOTIFY_CHANNEL says: count new jobs available now in queue (the
    notify statements write the same text in SQL)."""
    return f"{queue}:{count}"


def db_time():
    """The database's clock, in epoch seconds."""
    return models.execute(SQL["clock"]).fetchone()[0]


def take_callbacks(lease, limit, lease_s):
    """[{job_id, url, attempts, ended_at}] of up to `limit` due callbacks, now held under
    `lease` for lease_s seconds (see postgres.sql)."""
    return rows(models.execute(SQL["take_callbacks"], {"lease": lease, "limit": limit,
                                                       "lease_s": lease_s}))


def insert_jobs(new_jobs, api_key_id, limited_types, announce=False):
    """Store new jobs (core.submission.NewJob) of one API key in one statement. Returns
    (id, idempotency_key, status, run_at, created_at, held, type, unique_hold, expires_at)
    of each row stored, named, by id (the order given); a job whose idempotency key was
    used already, or whose unique key a job of its type holds, has none. announce: notify
    the jobs that can run now at this statement's commit (see postgres.sql)."""
    cursor = models.execute(SQL["insert_jobs"], {
        "jobs": new_jobs_json(new_jobs), "api_key_id": api_key_id,
        "limited_types": list(limited_types), "announce": announce,
        "channel": NOTIFY_CHANNEL})
    return named_rows(cursor)


def step(worker, reports, limit, turns=None, limits=None, guard=0.0):
    """Record reported outcomes (dicts, as core.jobs._reported makes them) and claim up to
    `limit` jobs for `worker`, in one statement: under no limit, the oldest, or those of
    `turns` (ids, fair share) in that order; then, when `limits` is given ({type: limits},
    core.flow.type_limits), the rest under limits. Returns (claimed rows, rows claimed under
    limits, {id: moved row}, {refused ids})."""
    cursor = models.execute(SQL["step"], _step_params(worker, reports, limit, turns, limits, guard))
    found = {"claimed": [], "limited": [], "moved": [], "refused": []}
    for kind, row in cursor.fetchall():
        found[kind].append(row)
    return (found["claimed"], found["limited"], {row["id"]: row for row in found["moved"]},
            {row["id"] for row in found["refused"]})


def _step_params(worker, reports, limit, turns=None, limits=None, guard=0.0):
    return {"reports": compact_json.encode(reports), "limit": limit, "turns": turns,
            "queues": _queues(worker),
            "worker_id": worker and worker.id, "host": worker and worker.host,
            "pid": worker and worker.pid,
            "limits": None if limits is None else compact_json.encode(limits), "guard": guard}


def claim_statement(worker, limit):
    """(sql, params): the statement a claim of `limit` jobs for `worker` runs."""
    return step_statement(worker, [], limit)


def step_statement(worker, reports, limit):
    """(sql, params): the statement `step` runs for these reports and this claim."""
    return SQL["step"], _step_params(worker, reports, limit)


def turns(worker, limit):
    """Fair share: [{id, queue, priority, owner}] of the due jobs to claim next, every
    lane's oldest first (see postgres.sql, turns)."""
    return rows(models.execute(SQL["turns"], {
        "limit": limit, "queues": _queues(worker)}))


def stale_claim(owner, lease_s):
    """The running jobs of `owner` whose heartbeat is older than lease_s, locked in this
    transaction; [] when another session holds any of them (see postgres.sql)."""
    locked = rows(models.execute(SQL["stale_claim"], {"owner": owner, "lease_s": lease_s}))
    return locked if locked and len(locked) == locked[0]["stale"] else []


def notify(counts):
    """Wake idle workers (every supervisor's) for jobs that can run now: {queue: count}.
    Inside a transaction, at its commit; outside one, in one statement (announce) whose
    own commit waits for no WAL flush: PostgreSQL serialises notifying commits on one lock
    held through the commit, so one that waited for its flush made every other wait too
    (single POST /v1/jobs, bench/RESULTS.md). A notification lost, with an unflushed
    commit or because the statement failed after the jobs' commit, costs a wake-up, never
    a job (workers poll); so that failure is logged, not raised: the jobs are stored, and a
    caller told otherwise would store them again."""
    if not counts:
        return
    if models.in_transaction():
        for queue, count in counts.items():
            models.execute(SQL["notify"], {"channel": NOTIFY_CHANNEL, "queue": queue,
                                           "count": str(count)})
        return
    try:
        models.execute(SQL["announce"], {"channel": NOTIFY_CHANNEL, "queues": list(counts),
                                         "counts": list(counts.values())}).fetchall()
    except models.DB_ERRORS as exc:
        log.warning("jobs stored but not announced (workers find them when they poll): %s",
                    str(exc).strip()[:200])
        models.reset_connection()


def job_counts(queue=None):
    """[{queue, status, count}] of every queue with jobs (of `queue` alone when given),
    from the counts kept as jobs change (see postgres.sql)."""
    return rows(models.execute(SQL["job_counts"], {"queue": queue}))


def fold_counts():
    """Fold the kept counts of sessions that ended into one row per queue and status."""
    with models.db.atomic():
        models.execute(SQL["fold_counts"], {}).fetchall()
        models.execute(SQL["drop_zero_counts"], {})


def miscounted():
    """[{queue, status, stored, counted}] where the kept counts differ from the jobs."""
    return rows(models.execute(SQL["miscounted"], {}))


def _queues(worker):
    """The worker's queues as the statements take them: null for every queue."""
    return list(worker.queues) if worker and worker.queues else None
