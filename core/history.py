"""Reading the record: one job with its attempts, pages of jobs, counts; and pruning what
is old enough to forget (SPEC §6, §7)."""
import base64
import json

import peewee as pw

from core import status as S
from core.errors import InvalidRequest, NotFound
from core.store import backend
from core.workers import workers_alive
from models import Attempt, Callback, Job, Step, db, now

MAX_LIMIT = 500


def get_job(job_id, api_key_id=None):
    """The job, or NotFound (also for another API key's job: 404, not 403)."""
    if not isinstance(job_id, int) or not 0 < job_id < 2 ** 63:
        raise NotFound(f"job {job_id} not found")
    query = Job.select().where(Job.id == job_id)
    if api_key_id is not None:
        query = query.where(Job.api_key_id == api_key_id)
    job = query.first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def attempts_of(job_id):
    return list(Attempt.select().where(Attempt.job_id == job_id).order_by(Attempt.number))


def encode_cursor(position):
    """An opaque cursor for "the page after position" (an id, a name)."""
    return base64.urlsafe_b64encode(json.dumps({"after": position}).encode()).decode().rstrip("=")


def _sql_integer(value):
    return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63


def decode_cursor(cursor, issued=_sql_integer):
    """The position in a cursor; InvalidRequest unless issued(position) says this server
    could have issued it (a job id by default), so no other value reaches the SQL."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))["after"]
        if issued(value):
            return value
    except (ValueError, TypeError, KeyError, UnicodeError, RecursionError):
        pass
    raise InvalidRequest("cursor is not one this server issued", ["cursor: invalid"])


def check_limit(limit):
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}", ["limit: out of range"])


def list_jobs(*, status=None, type=None, queue=None, api_key_id=None, parent_id=None, limit=50,
              cursor=None):
    """A page of jobs, newest first: (jobs, next_cursor or None). parent_id: the follow-ups
    of that job (SPEC §12)."""
    if status is not None and status not in S.STATUSES:
        raise InvalidRequest(f"unknown status {status!r}",
                             [f"status: must be one of {', '.join(S.STATUSES)}"])
    check_limit(limit)
    query = Job.select()
    for column, value in ((Job.status, status), (Job.type, type), (Job.queue, queue),
                          (Job.api_key_id, api_key_id), (Job.parent_id, parent_id)):
        if value is not None:
            query = query.where(column == value)
    if cursor:
        query = query.where(Job.id < decode_cursor(cursor))
    page = list(query.order_by(Job.id.desc()).limit(limit + 1))
    next_cursor = encode_cursor(page[limit - 1].id) if len(page) > limit else None
    return page[:limit], next_cursor


def stats(lease_s):
    """Counts by queue and status, the age of the oldest available job, live workers."""
    queues, totals = counts_by_queue(), {}
    for counts in queues.values():
        for status, count in counts.items():
            totals[status] = totals.get(status, 0) + count
    oldest = (Job.select(pw.fn.MIN(Job.run_at)).where(Job.status.in_(S.PENDING), Job.run_at <= now())
              .scalar())
    age = max(0.0, backend().db_time() - oldest) if oldest is not None else 0.0
    return {"queues": queues, "totals": totals, "oldest_available_age_s": round(age, 3),
            "workers_alive": workers_alive(lease_s)}


def counts_by_queue(queue=None):
    """{queue: {status: count}} of every queue with jobs (of `queue` alone when given);
    a status without jobs is left out."""
    counts = {}
    for row in backend().job_counts(queue):
        counts.setdefault(row["queue"], {})[row["status"]] = row["count"]
    return counts


def fold_counts():
    """Keep the table of counts small (the supervisor's duty; see core/store)."""
    backend().fold_counts()


def oldest_available_by_queue():
    """{queue: seconds its oldest due job has waited}, for queues with one."""
    current = backend().db_time()
    rows = (Job.select(Job.queue, pw.fn.MIN(Job.run_at))
            .where(Job.status.in_(S.PENDING), Job.run_at <= now()).group_by(Job.queue).tuples())
    return {queue: round(max(0.0, current - oldest), 3) for queue, oldest in rows}


def prune(older_than_s, batch=1000):
    """Delete succeeded and cancelled jobs finished more than older_than_s ago, with their
    attempts, steps and callbacks; dead jobs stay until retried or discarded. Returns the count.

    Oldest first, each batch from where the last one ended: the index entries of the rows
    deleted stay until a vacuum, and a batch that started from the oldest again would read
    past all of them (deleting 1.1 million jobs cost twice as much a job as 100,000).
    """
    cutoff = backend().db_time() - older_than_s
    removed, after = 0, None
    while True:
        with db.atomic():
            query = Job.select(Job.id, Job.finished_at).where(Job.status.in_(S.PRUNABLE),
                                                              Job.finished_at < cutoff)
            if after is not None:
                query = query.where(Job.finished_at >= after)
            page = list(query.order_by(Job.finished_at).limit(batch).tuples())
            if not page:
                return removed
            ids, after = [job_id for job_id, _ in page], page[-1][1]
            Attempt.delete().where(Attempt.job_id.in_(ids)).execute()
            Step.delete().where(Step.job_id.in_(ids)).execute()
            Callback.delete().where(Callback.job_id.in_(ids)).execute()
            removed += Job.delete().where(Job.id.in_(ids), Job.status.in_(S.PRUNABLE)).execute()
