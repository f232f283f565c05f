"""Signed callbacks (SPEC §12): a job submitted with a `callback_url` has its document
POSTed there once it ends, signed with its API key's callback secret, and retried with
backoff until a 2xx or until RETRY_WINDOW_S after the job ended.

A callback's state lives in `callbacks` (migrations/0011_callbacks.py): pending from the
submission, due once its job ends (a trigger on `jobs` marks that, whichever way the job
ended). A supervisor takes due callbacks under a lease (their due_at pushed past the
delivery, core/store `take_callbacks`), so the delivery of a supervisor killed mid-POST is
due again for any supervisor when the lease is over, and two never hold one at once; every
answer is recorded only under the lease it was taken with. Delivery is at least once.
The POST itself is the supervisor's (supervisor/callbacks.py): here, what is due, what a
signature is and what each answer makes of the callback.
"""
import hashlib
import hmac
import json
import logging
import uuid
from typing import NamedTuple, Optional

import peewee as pw

from core import documents, status as S
from core.history import attempts_of, get_job
from core.policy import backoff_delay
from core.store import backend
from infra import metrics
from models import ApiKey, Callback, Job, db, now

log = logging.getLogger("conveyor.callbacks")

RETRY_WINDOW_S = 24 * 3600.0  # retried until this long after the job ended
SIGNATURE_HEADER = "Conveyor-Signature"
MAX_ERROR_CHARS = 500


class Delivery(NamedTuple):
    """A due callback as a supervisor holds it: `attempt` is this POST's number."""
    job_id: int
    type: str
    url: str
    attempt: int
    ended_at: float
    lease: str
    secret: Optional[str]


def register(callbacks):
    """Store the callbacks of new jobs, [(job_id, url)], in the caller's transaction."""
    if callbacks:
        Callback.insert_many([{"job_id": job_id, "url": url} for job_id, url in callbacks]).execute()
        Job.update(has_callback=True).where(Job.id.in_([job_id for job_id, _ in callbacks])).execute()


def of_jobs(job_ids):
    """{job_id: Callback} of these jobs that have one (no query for none)."""
    if not job_ids:
        return {}
    return {row.job_id: row for row in Callback.select().where(Callback.job_id.in_(list(job_ids)))}


def of_job(job_id):
    return of_jobs([job_id]).get(job_id)


def sign(secret, body, timestamp):
    """The Conveyor-Signature header of body (bytes) sent at timestamp (unix seconds):
    t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with secret>."""
    timestamp = int(timestamp)
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def any_due():
    """Whether a callback is due now (read without locks: a hint to start delivering)."""
    return (Callback.select(Callback.job_id)
            .where(Callback.status == S.CALLBACK_PENDING, Callback.due_at.is_null(False),
                   Callback.due_at <= now())
            .exists())


def take_due(owner, limit, lease_s):
    """Up to `limit` due callbacks, held for `owner` (a supervisor) for lease_s seconds:
    none of them is taken again before then, by anyone."""
    lease = f"{owner}:{uuid.uuid4().hex[:12]}"
    with db.atomic():
        taken = backend().take_callbacks(lease, limit, lease_s)
    if not taken:
        return []
    owners = {job.id: job for job in Job.select(Job.id, Job.type, ApiKey.callback_secret)
              .join(ApiKey, pw.JOIN.LEFT_OUTER, on=(ApiKey.id == Job.api_key_id))
              .where(Job.id.in_([row["job_id"] for row in taken])).objects()}
    return [Delivery(row["job_id"], owners[row["job_id"]].type, row["url"], row["attempts"],
                     row["ended_at"], lease, owners[row["job_id"]].callback_secret)
            for row in taken if row["job_id"] in owners]


def body(delivery):
    """What a delivery POSTs: the job's document as GET /v1/jobs/{id} shows it, as bytes."""
    job = get_job(delivery.job_id)
    document = documents.job(job, attempts_of(job.id), of_job(job.id))
    return json.dumps(document, separators=(",", ":")).encode()


def delivered(delivery):
    """The receiver answered 2xx. False when the lease was lost meanwhile (the callback
    is someone else's now, or its job ended again): nothing is recorded."""
    done = _settle(delivery, status=S.CALLBACK_DELIVERED, delivered_at=now(), due_at=None,
                   last_error=None)
    if done:
        metrics.count("conveyor_callbacks_delivered", type=delivery.type)
        log.info("callback of job %d delivered to %s (attempt %d)", delivery.job_id,
                 delivery.url, delivery.attempt, extra={"job_id": delivery.job_id})
    return done


def not_delivered(delivery, error, base_s, max_s, give_up=False):
    """The POST failed (error says how): retried after a backoff, unless give_up (no
    retry would fare better) or the retry window is over, when the callback is failed."""
    error = error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + "…"
    delay = backoff_delay(delivery.attempt, base_s, max_s)
    retry_at = backend().db_time() + delay
    if give_up or retry_at > delivery.ended_at + RETRY_WINDOW_S:
        done = _settle(delivery, status=S.CALLBACK_FAILED, due_at=None, last_error=error)
        if done:
            metrics.count("conveyor_callbacks_failed", type=delivery.type)
            log.warning("callback of job %d failed after %d attempts: %s", delivery.job_id,
                        delivery.attempt, error, extra={"job_id": delivery.job_id})
        return done
    log.info("callback of job %d not delivered (attempt %d), retried in %.1fs: %s",
             delivery.job_id, delivery.attempt, delay, error,
             extra={"job_id": delivery.job_id})
    return _settle(delivery, due_at=retry_at, last_error=error)


def _settle(delivery, **values):
    """Record the answer of a delivery only under the lease it was taken with."""
    return bool(Callback.update(lease=None, **values)
                .where(Callback.job_id == delivery.job_id, Callback.lease == delivery.lease,
                       Callback.status == S.CALLBACK_PENDING)
                .execute())


def pending_count():
    """Callbacks whose job ended and that are neither delivered nor failed yet."""
    return (Callback.select()
            .where(Callback.status == S.CALLBACK_PENDING, Callback.due_at.is_null(False))
            .count())
