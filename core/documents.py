"""What jobs, attempts, workers and queues look like to users: the JSON of the API, of
`--json` and of the job a callback sends (the supervisor sends it, and never imports web)."""
from core.times import timestamp
from core import status as statuses


def job(row, attempts=None, callback=None):
    """A job; with its attempts when given, and with its callback (a models.Callback) when
    it was submitted with a callback_url."""
    document = {
        "id": row.id,
        "type": row.type,
        "queue": row.queue,
        "payload": row.payload,
        "priority": row.priority,
        "run_at": timestamp(row.run_at),
        "max_attempts": row.max_attempts,
        "timeout_s": row.timeout_s,
        "backoff": {"base_s": row.backoff_base_s, "max_s": row.backoff_max_s},
        "status": row.status,
        "attempt": row.attempt,
        "idempotency_key": row.idempotency_key,
        "group": row.group_key,
        "result": row.result,
        "progress": row.progress,
        "last_error": row.last_error,
        "created_at": timestamp(row.created_at),
        "finished_at": timestamp(row.finished_at),
    }
    if row.status == statuses.DEAD:
        document["dead_reason"] = row.dead_reason
    if row.cancel_requested_at is not None:
        document["cancel_requested_at"] = timestamp(row.cancel_requested_at)
    if row.cancel_reason is not None:
        document["cancel_reason"] = row.cancel_reason
    if row.parent_id is not None:
        document["parent_id"] = row.parent_id
    if row.unique_key is not None:
        document["unique_key"] = row.unique_key
        document["unique_while"] = row.unique_while
    if row.expires_at is not None:
        document["expires_at"] = timestamp(row.expires_at)
    if attempts is not None:
        document["attempts"] = [attempt(a) for a in attempts]
    if callback is not None:
        document["callback_url"] = callback.url
        document["callback"] = {"status": callback.status, "attempts": callback.attempts,
                                "last_error": callback.last_error}
    return document


def attempt(row):
    duration = None
    if row.finished_at is not None:
        duration = round((row.finished_at - row.started_at) * 1000, 3)
    return {
        "number": row.number,
        "status": row.status,
        "worker_id": row.worker_id,
        "host": row.host,
        "pid": row.pid,
        "started_at": timestamp(row.started_at),
        "finished_at": timestamp(row.finished_at),
        "duration_ms": duration,
        "error_type": row.error_type,
        "error_message": row.error_message,
        "traceback": row.traceback,
        "fenced": bool(row.fenced),
    }


def worker(row):
    return {
        "id": row.id,
        "supervisor_id": row.supervisor_id,
        "host": row.host,
        "pid": row.pid,
        "queues": row.queues or [],
        "started_at": timestamp(row.started_at),
        "last_heartbeat_at": timestamp(row.last_heartbeat_at),
        "current_job_id": row.current_job_id,
    }


def page(items, next_cursor):
    return {"items": items, "next_cursor": next_cursor}


def schedule(row, next_runs=None, runs=None):
    document = {
        "name": row.name,
        "cron": row.cron,
        "type": row.type,
        "payload": row.payload,
        "queue": row.queue,
        "priority": row.priority,
        "timezone": row.timezone,
        "overlap": row.overlap,
        "paused": bool(row.paused),
        "next_run_at": None if row.paused else timestamp(row.next_run_at),
        "created_at": timestamp(row.created_at),
        "updated_at": timestamp(row.updated_at),
    }
    if next_runs is not None:
        document["next_runs"] = [timestamp(t) for t in next_runs]
    if runs is not None:
        document["recent_runs"] = [schedule_run(run) for run in runs]
    return document


def schedule_run(row):
    return {
        "slot": timestamp(row.slot),
        "outcome": row.outcome,
        "job_id": row.job_id,
        "job_status": getattr(row, "job_status", None),
        "reason": row.reason,
        "fired_at": timestamp(row.created_at),
    }


def queue(row):
    """A queue (core.queues.Queue): its jobs by status and its settings."""
    return {
        "name": row.name,
        "counts": row.counts,
        "paused": row.paused,
        "concurrency": row.concurrency,
        "rate": row.rate,
        "updated_at": timestamp(row.updated_at),
    }


def me(row, default_rate_limit):
    """The calling key as GET /v1/me shows it: its callback secret, never its own secret."""
    return {
        "name": row.name,
        "role": row.role,
        "rate_limit": row.rate_limit or default_rate_limit,
        "callback_secret": row.callback_secret,
    }


def api_key(row):
    """A key as `flask keys list --json` shows it: never its secret or hash."""
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "rate_limit": row.rate_limit,
        "created_at": timestamp(row.created_at),
        "revoked_at": timestamp(row.revoked_at),
    }
