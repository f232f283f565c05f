"""The registry of live worker processes (SPEC §6 `GET /v1/workers`): each registers a new
identity when it starts and renews it with every heartbeat; a stale one is forgotten."""
from dataclasses import dataclass

from core import status as S
from models import Job, Worker, now


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    supervisor_id: str
    host: str
    pid: int
    queues: tuple = ()


def register_worker(worker):
    Worker.insert(id=worker.id, supervisor_id=worker.supervisor_id, host=worker.host,
                  pid=worker.pid, queues=list(worker.queues), started_at=now(),
                  last_heartbeat_at=now()).on_conflict(action="NOTHING").execute()


def renew_worker(worker):
    """Renew the worker's registration (made again if it was forgotten)."""
    if not Worker.update(last_heartbeat_at=now()).where(Worker.id == worker.id).execute():
        register_worker(worker)


def deregister_worker(worker_id):
    Worker.delete().where(Worker.id == worker_id).execute()


def forget_stale_workers(lease_s):
    """Drop registrations whose heartbeat is older than the lease (their host is gone)."""
    return Worker.delete().where(Worker.last_heartbeat_at < now() - lease_s).execute()


def live_workers(lease_s):
    """Workers heard from within the lease, each with current_job_id: the job it holds now
    (read from the jobs, so it is never staler than the lease itself)."""
    workers = list(Worker.select().where(Worker.last_heartbeat_at >= now() - lease_s)
                   .order_by(Worker.started_at))
    holding = dict(Job.select(Job.lease_owner, Job.id)
                   .where(Job.status == S.RUNNING,
                          Job.lease_owner.in_([worker.id for worker in workers])).tuples())
    for worker in workers:
        worker.current_job_id = holding.get(worker.id)
    return workers


def workers_alive(lease_s):
    return Worker.select().where(Worker.last_heartbeat_at >= now() - lease_s).count()
