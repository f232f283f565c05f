"""The core's statements on PostgreSQL (postgres.sql), run prepared (models.execute)."""
import models
from core.store.queries import compact_json, load, rows

SQL = load("postgres.sql")

# On PostgreSQL, stored jobs that can run now are announced on this channel, in the
# transaction that stores them; each supervisor LISTENs and wakes that many workers.
NOTIFY_CHANNEL = "conveyor_jobs"


def notify_payload(queue, count):
    """What a NOTIFY on NOTIFY_CHANNEL says: count new jobs available now in queue (the
    statements that store jobs write the same text in SQL)."""
    return f"{queue}:{count}"


def db_time():
    """The database's clock, in epoch seconds."""
    return models.execute(SQL["clock"]).fetchone()[0]


def insert_jobs(new_jobs, api_key_id, limited_types):
    """Store new jobs (core.submission.NewJob) of one API key in one statement. Returns
    {id, idempotency_key, status, run_at, created_at} of each row stored, by id (the order
    given); a job whose idempotency key was used already has none."""
    given = [(new.type, new.queue, new.payload_json, new.priority, new.run_at, new.delay_s,
              new.max_attempts, new.timeout_s, new.backoff_base_s, new.backoff_max_s,
              new.idempotency_key, new.request_hash, new.group_key) for new in new_jobs]
    cursor = models.execute(SQL["insert_jobs"], {
        "jobs": compact_json.encode(given), "api_key_id": api_key_id, "channel": NOTIFY_CHANNEL,
        "limited_types": list(limited_types)})
    return rows(cursor)


def step(worker, reports, limit, turns=None):
    """Record reported outcomes (dicts, as core.jobs._reported makes them) and claim up to
    `limit` jobs under no limit for `worker`, in one statement: the oldest, or those of
    `turns` (ids, fair share) in that order. Returns (claimed rows, {id: moved row},
    {refused ids})."""
    cursor = models.execute(SQL["step"], _step_params(worker, reports, limit, turns))
    claimed, moved, refused = [], {}, set()
    for kind, row in cursor.fetchall():
        if kind == "claimed":
            claimed.append(row)
        elif kind == "moved":
            moved[row["id"]] = row
        else:
            refused.add(row["id"])
    return claimed, moved, refused


def _step_params(worker, reports, limit, turns=None):
    return {"reports": compact_json.encode(reports), "limit": limit, "turns": turns,
            "queues": _queues(worker),
            "worker_id": worker and worker.id, "host": worker and worker.host,
            "pid": worker and worker.pid}


def claim_statement(worker, limit):
    """(sql, params): the statement a claim of `limit` jobs for `worker` runs."""
    return SQL["step"], _step_params(worker, [], limit)


def turns(worker, limit):
    """Fair share: [{id, queue, priority, owner}] of the due jobs to claim next, every
    lane's oldest first (see postgres.sql, turns)."""
    return rows(models.execute(SQL["turns"], {
        "limit": limit, "queues": _queues(worker)}))


def claim_limited(worker, limits, guard):
    """Claim at most one due job under limits for `worker` (see postgres.sql)."""
    return rows(models.execute(SQL["claim_limited"], {
        "worker_id": worker.id, "host": worker.host, "pid": worker.pid,
        "queues": _queues(worker),
        "limits": compact_json.encode(limits), "guard": guard}))


def stale_claim(owner, lease_s):
    """The running jobs of `owner` whose heartbeat is older than lease_s, locked in this
    transaction; [] when another session holds any of them (see postgres.sql)."""
    locked = rows(models.execute(SQL["stale_claim"], {"owner": owner, "lease_s": lease_s}))
    return locked if locked and len(locked) == locked[0]["stale"] else []


def notify(counts):
    """Wake idle workers (every supervisor's) for jobs that can run now: {queue: count}."""
    for queue, count in counts.items():
        models.execute(SQL["notify"], {"channel": NOTIFY_CHANNEL, "queue": queue,
                                       "count": str(count)})


def _queues(worker):
    """The worker's queues as the statements take them: null for every queue."""
    return list(worker.queues) if worker and worker.queues else None
