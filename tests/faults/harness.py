"""The fault-injection harness: run t.chaos jobs on real supervisors while faults are
injected, then check from the database and the handlers' side-effect log that nothing was
lost, no attempt ran twice, no two attempts of a job overlapped and `flask audit` is clean.

Each scenario is a function of a Conveyor (tests/conftest.py) and a size; it returns the
run's Figures. The pytest scenarios (tests/faults/test_faults_*.py) run them small; the
soak command (`python -m tests.faults.soak`) runs them at full size, over and over.
"""
import contextlib
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlparse

import requests

from apiserver import Gunicorn
# LONG_LEASE where a worker's death is seen by its supervisor at once (no lease need
# expire); SHORT_LEASE where recovery goes through the lease (a host lost, a worker stalled
# or cut off).
from checks import LONG_LEASE, SHORT_LEASE, gate_path, release
from conftest import ProcessGroup, side_effects, wait_for
from proxy import PartitionProxy

FINAL = ("succeeded", "dead", "cancelled")


@dataclass
class Figures:
    """What one run did and what the final checks found."""
    scenario: str
    backend: str
    seed: int
    jobs: int = 0
    succeeded: int = 0
    dead: int = 0
    attempts: int = 0
    fenced: int = 0
    kills: int = 0
    restarts: int = 0
    stalls: int = 0
    partitions: int = 0
    failovers: int = 0
    lost: int = 0
    duplicated_attempts: int = 0
    overlaps: int = 0
    misrecorded: int = 0
    audit_violations: int = 0
    seconds: float = 0.0
    api_answers: dict = field(default_factory=dict)  # HTTP status: count, where probed
    timings: dict = field(default_factory=dict)  # name: seconds, what a scenario measured
    problems: list = field(default_factory=list)

    @property
    def clean(self):
        return not (self.lost or self.duplicated_attempts or self.overlaps or self.misrecorded
                    or self.audit_violations or self.problems)

    def line(self):
        faults = " ".join(f"{name}={getattr(self, name)}"
                          for name in ("kills", "restarts", "stalls", "partitions", "failovers")
                          if getattr(self, name))
        api = "".join(f"api_{status}={count} " for status, count in sorted(self.api_answers.items()))
        api += "".join(f"{name}={seconds:.2f}s " for name, seconds in self.timings.items())
        return (f"{self.scenario} [{self.backend}] jobs={self.jobs} succeeded={self.succeeded} "
                f"dead={self.dead} attempts={self.attempts} fenced={self.fenced} "
                f"{faults or 'faults=0'} lost={self.lost} "
                f"duplicated_attempts={self.duplicated_attempts} overlaps={self.overlaps} "
                f"misrecorded={self.misrecorded} audit_violations={self.audit_violations} "
                f"{api}seconds={self.seconds:.0f} seed={self.seed}")

    def report(self):
        return "\n".join([self.line(), *self.problems[:30]])


@dataclass
class HostFigures(Figures):
    """A run's Figures, and what became of the jobs a host held when it was cut off."""
    hosts: int = 0
    cut_off: int = 0  # attempts the host was running when it was cut off
    recovered: int = 0  # of those, taken over by another host after their lease
    reaped_s: float = 0.0  # from the cut to the last of them ended by another host's reaper
    first_recovery_s: float = 0.0  # from the cut to the first of them running elsewhere
    recovery_s: float = 0.0  # ...to the last of them
    partition_s: float = 0.0
    after_heal: int = 0  # attempts the host ran to success once healed

    def line(self):
        return (f"{super().line()} hosts={self.hosts} cut_off={self.cut_off} "
                f"recovered={self.recovered} reaped_s={self.reaped_s:.1f} "
                f"recovery_s={self.first_recovery_s:.1f}"
                f"-{self.recovery_s:.1f} partition_s={self.partition_s:.1f} "
                f"after_heal={self.after_heal}")


# ---------------------------------------------------------------------------- running

def seed():
    """FAULTS_SEED, to replay a run; else a new one (every figure line prints its seed)."""
    return int(os.environ.get("FAULTS_SEED") or random.randrange(2 ** 32))


def retrying(operation, timeout=120.0):
    """Run a database read of the harness itself through an outage."""
    from models import DB_ERRORS, reset_connection
    deadline = time.monotonic() + timeout
    while True:
        try:
            return operation()
        except DB_ERRORS:
            reset_connection()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# Every FOLLOWUPS_EVERY-th chaos job asks for FOLLOWUPS follow-up jobs (ctx.enqueue): the
# check finds each succeeded one with exactly that many, and a dead one with none.
FOLLOWUPS_EVERY, FOLLOWUPS = 10, 2


def submit_chaos(conveyor, count, effects_log, batch=500):
    ids = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        ids += conveyor.submit_many("t.chaos", [
            {"log": effects_log, **({"followups": FOLLOWUPS, "followup_type": "t.chaos"}
                                    if n % FOLLOWUPS_EVERY == 0 else {})}
            for n in range(start, start + size)])
    return ids


def unfinished():
    from models import Job
    return Job.select().where(Job.status.not_in(FINAL)).count()


def drain(timeout_s, quiet_s=60.0):
    """Wait until every job is final; fail when nothing finishes for quiet_s seconds."""
    deadline = time.monotonic() + timeout_s
    left, progress_at = retrying(unfinished), time.monotonic()
    while left:
        if time.monotonic() > deadline or time.monotonic() - progress_at > quiet_s:
            raise AssertionError(f"{left} jobs still unfinished (no progress for "
                                 f"{time.monotonic() - progress_at:.0f}s)")
        time.sleep(0.2)
        now_left = retrying(unfinished)
        if now_left != left:
            left, progress_at = now_left, time.monotonic()


def wait_done_fraction(total, fraction, timeout_s=300.0):
    """Wait until `fraction` of total jobs are final."""
    deadline = time.monotonic() + timeout_s
    while retrying(unfinished) > total * (1 - fraction):
        if time.monotonic() > deadline:
            raise AssertionError(f"under {fraction:.0%} of {total} jobs done in {timeout_s}s")
        time.sleep(0.1)


class ChaosLoop:
    """Call strike() every ~every_s seconds (jittered) in a thread, until stop()."""

    def __init__(self, strike, every_s, rng):
        self.strike, self.every_s, self.rng = strike, every_s, rng
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every_s * self.rng.uniform(0.5, 1.5)):
            try:
                self.strike()
            except Exception as exc:  # noqa: BLE001 - reported with the figures
                self.errors.append(f"chaos loop: {type(exc).__name__}: {exc}")

    def stop(self):
        self._stop.set()
        self._thread.join(60)
        return self.errors


def stop_pool(supervisors, grace_s=20.0):
    """SIGTERM every live supervisor, so running attempts finish and late outcomes get
    reported; each must exit 0 by itself. Returns the problems."""
    live = [supervisor for supervisor in supervisors if supervisor.proc.poll() is None]
    for supervisor in live:
        supervisor.proc.send_signal(signal.SIGTERM)
    problems = []
    for supervisor in live:
        try:
            code = supervisor.proc.wait(grace_s)
            if code != 0:
                problems.append(f"supervisor {supervisor.pid} exited {code} on SIGTERM")
        except subprocess.TimeoutExpired:
            problems.append(f"supervisor {supervisor.pid} still running {grace_s:g}s after "
                            f"SIGTERM (log: {supervisor.log_path})")
    for supervisor in supervisors:
        supervisor.kill_group()
    return problems


def start_pool(conveyor, supervisors=2, concurrency=4, **env):
    pool = [conveyor.start_supervisor(concurrency=concurrency, **env) for _ in range(supervisors)]
    for supervisor in pool:
        supervisor.wait_for_workers(concurrency, timeout=60)
    return pool


# ---------------------------------------------------------------------------- the checks

def check(conveyor, figures, effects_log, acknowledged=()):
    """Fill figures from the final database and side-effect log (and `flask audit`)."""
    from models import Attempt, Job

    def problem(kind, text):
        setattr(figures, kind, getattr(figures, kind) + 1)
        figures.problems.append(f"{kind}: {text}")

    jobs = {job.id: job for job in retrying(lambda: list(Job.select()))}
    children = defaultdict(list)  # follow-up jobs (SPEC §12) by parent
    for job in jobs.values():
        if job.parent_id is not None:
            children[job.parent_id].append(job)
    history = defaultdict(dict)
    for attempt in retrying(lambda: list(Attempt.select())):
        if attempt.number in history[attempt.job_id]:
            problem("duplicated_attempts", f"job {attempt.job_id}: two rows for attempt "
                                           f"{attempt.number}")
        history[attempt.job_id][attempt.number] = attempt
    figures.jobs = len(jobs)
    figures.attempts = sum(len(attempts) for attempts in history.values())
    figures.fenced = sum(a.fenced for attempts in history.values() for a in attempts.values())

    for job_id in acknowledged:
        if job_id not in jobs:
            problem("lost", f"job {job_id} was acknowledged but is not in the database")
    for job in jobs.values():
        figures.succeeded += job.status == "succeeded"
        figures.dead += job.status == "dead"
        if job.status not in ("succeeded", "dead"):
            problem("lost", f"job {job.id} ended {job.status}")
        running = [n for n, a in history[job.id].items() if a.status == "running"]
        if running:
            problem("lost", f"job {job.id} ({job.status}) has attempts {running} stuck running")
        succeeded = [n for n, a in history[job.id].items() if a.status == "succeeded"]
        if job.status == "succeeded" and len(succeeded) != 1:
            problem("misrecorded", f"job {job.id} succeeded with succeeded attempts {succeeded}")
        if job.status == "dead" and succeeded:
            problem("misrecorded", f"job {job.id} is dead after attempts {succeeded} succeeded")
        made = children.get(job.id, [])
        wanted = job.payload.get("followups", 0) if job.status == "succeeded" else 0
        if len(made) != wanted or len({child.payload.get("i") for child in made}) != wanted:
            problem("misrecorded", f"job {job.id} ({job.status}) made follow-ups "
                                   f"{sorted(child.payload.get('i') for child in made)}, "
                                   f"not {wanted} once each")
        ordered = [history[job.id][n] for n in sorted(history[job.id])]
        for earlier, later in zip(ordered, ordered[1:]):
            if earlier.finished_at is None or later.started_at < earlier.finished_at:
                problem("overlaps", f"job {job.id}: attempt {later.number} started before "
                                    f"attempt {earlier.number} was recorded finished")

    starts, ends = defaultdict(list), defaultdict(list)
    for event, job_id, number, pid, at in side_effects(effects_log):
        key = (int(job_id), int(number))
        (starts if event == "start" else ends)[key].append((event, int(pid), float(at)))
    for (job_id, number), runs in starts.items():
        attempt = history[job_id].get(number)
        if len(runs) > 1:
            problem("duplicated_attempts",
                    f"job {job_id} attempt {number} started {len(runs)} times")
        elif attempt is None or attempt.pid != runs[0][1]:
            problem("duplicated_attempts", f"job {job_id} attempt {number} ran in pid "
                                           f"{runs[0][1]}, which the database never gave it")
    for job_id, attempts in history.items():
        for number, attempt in attempts.items():
            outcome = [event for event, pid, _ in ends[(job_id, number)] if pid == attempt.pid]
            if attempt.status == "succeeded" and outcome != ["end"]:
                problem("misrecorded", f"job {job_id} attempt {number} recorded succeeded, "
                                       f"the handler says {outcome or 'nothing'}")
            if attempt.status == "failed" and outcome != ["fail"]:
                problem("misrecorded", f"job {job_id} attempt {number} recorded failed, "
                                       f"the handler says {outcome or 'nothing'}")
        # An attempt whose handler was still running after a later attempt began must have
        # had its outcome refused: only a fenced attempt may overlap another.
        numbers = sorted(n for n in attempts if (job_id, n) in starts)
        for i, earlier in enumerate(numbers):
            finished = [at for _, _, at in ends[(job_id, earlier)]]
            for later in numbers[i + 1:]:
                began = starts[(job_id, later)][0][2]
                if finished and max(finished) > began and not attempts[earlier].fenced:
                    problem("overlaps", f"job {job_id}: attempt {earlier} ran until after "
                                        f"attempt {later} began, and its outcome was not refused")

    result = conveyor.flask("audit", "--json", check=False)
    try:
        violations = json.loads(result.stdout)["violations"]
    except ValueError:
        violations = [{"detail": f"flask audit failed: {result.stdout}{result.stderr}"}]
    figures.audit_violations = len(violations)
    figures.problems += [f"audit: {v}" for v in violations[:10]]
    return figures


def integrity_problems(sqlite_path):
    """PRAGMA integrity_check of a SQLite file, opened fresh: [] when it is sound."""
    connection = sqlite3.connect(sqlite_path, timeout=30)
    try:
        rows = [row[0] for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()
    return [] if rows == ["ok"] else rows


# ---------------------------------------------------------------------------- scenarios

def worker_chaos(conveyor, jobs, seed, kill_every_s=0.2, supervisors=2, concurrency=4):
    """kill -9 a random worker process every ~kill_every_s while the jobs run."""
    rng, started = random.Random(seed), time.monotonic()
    figures = Figures("worker-chaos", _backend(conveyor), seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    pool = start_pool(conveyor, supervisors, concurrency, **LONG_LEASE)
    submit_chaos(conveyor, jobs, effects_log)

    def kill_a_worker():
        victims = [pid for supervisor in pool for pid in supervisor.worker_pids()]
        if victims:
            _kill(rng.choice(victims), signal.SIGKILL)
            figures.kills += 1
    chaos = ChaosLoop(kill_a_worker, kill_every_s, rng)
    try:
        drain(timeout_s=max(600, jobs / 5))
    finally:
        figures.problems += chaos.stop()
        figures.problems += stop_pool(pool)
    figures.seconds = time.monotonic() - started
    return check(conveyor, figures, effects_log)


def host_chaos(conveyor, jobs, seed, kill_every_s=2.0, supervisors=2, concurrency=4):
    """kill -9 a random supervisor every ~kill_every_s, with all its workers (a host lost)
    or alone (its workers orphaned), and start a new one in its place."""
    rng, started = random.Random(seed), time.monotonic()
    figures = Figures("host-chaos", _backend(conveyor), seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    env = {**SHORT_LEASE}
    pool = start_pool(conveyor, supervisors, concurrency, **env)
    submit_chaos(conveyor, jobs, effects_log)

    def kill_a_host():
        index = rng.randrange(len(pool))
        victim = pool[index]
        if rng.random() < 0.75:
            victim.kill_host()
        else:
            victim.signal(signal.SIGKILL)  # the supervisor alone: its workers must stop
            victim.wait(10)
        figures.kills += 1
        time.sleep(rng.uniform(0, 0.5))
        pool[index] = conveyor.start_supervisor(concurrency=concurrency, **env)
        pool[index].wait_for_workers(concurrency, timeout=60)  # a host back up, then fair game
        figures.restarts += 1
    chaos = ChaosLoop(kill_a_host, kill_every_s, rng)
    try:
        drain(timeout_s=max(600, jobs / 3))
    finally:
        figures.problems += chaos.stop()
        figures.problems += stop_pool(conveyor.supervisors)
    figures.seconds = time.monotonic() - started
    return check(conveyor, figures, effects_log)


def worker_stalls(conveyor, jobs, seed, stall_every_s=1.0, supervisors=2, concurrency=4):
    """SIGSTOP a random worker past its lease, then SIGCONT it, over and over: its late
    outcome must be refused."""
    rng, started = random.Random(seed), time.monotonic()
    figures = Figures("stalls", _backend(conveyor), seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    lease_s = SHORT_LEASE["LEASE_S"]
    pool = start_pool(conveyor, supervisors, concurrency, **SHORT_LEASE)
    submit_chaos(conveyor, jobs, effects_log)
    frozen = {}  # pid: when to thaw it

    def stall_a_worker():
        now_m = time.monotonic()
        for pid, thaw_at in list(frozen.items()):
            if now_m >= thaw_at:
                _kill(pid, signal.SIGCONT)
                del frozen[pid]
        victims = [pid for supervisor in pool for pid in supervisor.worker_pids()
                   if pid not in frozen]
        if victims and len(frozen) < concurrency * supervisors // 4:
            pid = rng.choice(victims)
            _kill(pid, signal.SIGSTOP)
            frozen[pid] = now_m + lease_s + rng.uniform(0.5, 2.5)
            figures.stalls += 1
    chaos = ChaosLoop(stall_a_worker, stall_every_s, rng)
    try:
        drain(timeout_s=max(600, jobs / 3))
    finally:
        figures.problems += chaos.stop()
        for pid in frozen:
            _kill(pid, signal.SIGCONT)
        figures.problems += stop_pool(pool)
    figures.seconds = time.monotonic() - started
    return check(conveyor, figures, effects_log)


def partitions(conveyor, jobs, seed, every_s=1.0, supervisors=2, concurrency=4):
    """Cut one supervisor (and its workers) off the database for longer than the lease,
    again and again, through a proxy that black-holes its traffic; the other supervisor
    takes over its jobs, and its late outcomes are refused when the link returns."""
    rng, started = random.Random(seed), time.monotonic()
    figures = Figures("partitions", _backend(conveyor), seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    lease_s = SHORT_LEASE["LEASE_S"]
    where = urlparse(conveyor.database_url)
    proxy = PartitionProxy(where.hostname, where.port or 5432)
    pool = start_pool(conveyor, supervisors - 1, concurrency, **SHORT_LEASE)
    pool += start_pool(conveyor, 1, concurrency, DATABASE_URL=proxy.url_for(conveyor.database_url),
                       **SHORT_LEASE)
    submit_chaos(conveyor, jobs, effects_log)

    def partition():
        proxy.cut()
        figures.partitions += 1
        time.sleep(lease_s + rng.uniform(0.5, 3.0))
        proxy.heal()
    chaos = ChaosLoop(partition, every_s, rng)
    try:
        drain(timeout_s=max(600, jobs / 3))
    finally:
        figures.problems += chaos.stop()
        proxy.heal()
        figures.problems += stop_pool(pool)
        proxy.close()
    figures.seconds = time.monotonic() - started
    return check(conveyor, figures, effects_log)


def host_partition(conveyor, hosts, jobs, seed, concurrency=3):
    """A supervisor on each of several hosts (network namespaces, tests/faults/hosts.py)
    sharing one PostgreSQL across a switch. The host running a long job (a t.gate held
    until after the heal) is partitioned away by the kernel under a load of t.chaos jobs,
    until the other hosts have taken over every job it held (after their lease), then
    healed: the long job's late result must be refused, and the host must serve again."""
    from core.jobs import db_time
    started = time.monotonic()
    figures = HostFigures("many-hosts", "postgres", seed, hosts=len(hosts.hosts))
    effects_log = str(conveyor.tmp_path / "effects.log")
    gate = gate_path(conveyor.tmp_path)
    url = hosts.url_for(conveyor.database_url)
    pool = [conveyor.start_supervisor(concurrency, on=host.command, DATABASE_URL=url,
                                      **SHORT_LEASE) for host in hosts.hosts]
    victim = cut_at = heal_at = None
    try:
        for supervisor in pool:
            supervisor.wait_for_workers(concurrency, timeout=60)
        long_job = conveyor.submit("t.gate", {"gate": gate, "hold": [1], "log": effects_log})
        acknowledged = [long_job, *submit_chaos(conveyor, jobs, effects_log)]
        first = wait_for(lambda: retrying(lambda: _begun(long_job, effects_log)), timeout=60,
                         message=f"job {long_job} to begin")
        victim = next(host for host in hosts.hosts if host.name == first.host)
        wait_for(lambda: len(retrying(lambda: _running_on(victim.name))) > 1, timeout=60,
                 message=f"{victim.name} to run jobs beside the long one")
        cut_at = retrying(db_time)
        hosts.partition(victim)
        figures.partitions += 1
        held = retrying(lambda: _running_on(victim.name))  # it commits nothing any more
        renewed = retrying(lambda: _renewed(held))
        wait_for(lambda: retrying(lambda: _moved_on(held)), timeout=60,
                 message=f"the jobs {victim.name} held to run elsewhere")
        heal_at = retrying(db_time)
        hosts.heal(victim)
        release(gate, 1)  # the long job's first attempt ends, on the healed host
        acknowledged += submit_chaos(conveyor, jobs // 2, effects_log)  # for the healed host too
        wait_for(lambda: retrying(lambda: _succeeded_on(victim.name, heal_at)), timeout=60,
                 message=f"{victim.name} to run a job once healed")
        drain(timeout_s=300, quiet_s=30)
    finally:
        if cut_at is not None and heal_at is None:
            hosts.heal(victim)
        release(gate, 1)
        figures.problems += stop_pool(pool)
    figures.seconds = time.monotonic() - started
    figures.partition_s = heal_at - cut_at
    check(conveyor, figures, effects_log, acknowledged)
    _taken_over(figures, victim.name, held, renewed, cut_at)
    figures.after_heal = _succeeded_on(victim.name, heal_at)
    first = retrying(lambda: _attempt(long_job, 1))
    if not first.fenced:
        figures.problems.append(f"job {long_job}: the late result of attempt 1 on "
                                f"{victim.name} was not refused ({first.status})")
    return figures


def _begun(job_id, effects_log):
    """Attempt 1 of the job once its handler has begun (logged its start)."""
    if any(line[:3] == ["start", str(job_id), "1"] for line in side_effects(effects_log)):
        return _attempt(job_id, 1)
    return None


def _attempt(job_id, number):
    from models import Attempt
    return Attempt.get((Attempt.job_id == job_id) & (Attempt.number == number))


def _running_on(host):
    from models import Attempt
    return [(a.job_id, a.number) for a in Attempt.select(Attempt.job_id, Attempt.number)
            .where(Attempt.host == host, Attempt.status == "running")]


def _succeeded_on(host, since):
    from models import Attempt
    return Attempt.select().where(Attempt.host == host, Attempt.status == "succeeded",
                                  Attempt.started_at >= since).count()


def _moved_on(held):
    """Whether every held job has begun a later attempt, or ended."""
    from models import Job
    now = dict(Job.select(Job.id, Job.attempt).where(Job.id.in_([j for j, _ in held]),
                                                     Job.status.not_in(FINAL)).tuples())
    return all(now.get(job_id, number + 1) > number for job_id, number in held)


def _renewed(held):
    """When the lease of each held job was last renewed (its heartbeat_at), by job."""
    from models import Job
    return dict(Job.select(Job.id, Job.heartbeat_at).where(Job.id.in_([j for j, _ in held]))
                .tuples())


def _taken_over(figures, host, held, renewed, cut_at):
    """Where the attempts the host held when it was cut off went: each must have been
    ended by another host's reaper (LeaseExpired; Released, for a claimed job it had not
    begun when another one of its claim was charged), and its job run again on another host
    after its lease expired (`renewed`, then LEASE_S), or dead-lettered (its attempts
    spent). That all of it happened before the heal, the scenario waited for."""
    from models import Attempt, Job
    recoveries = []
    for job_id, number in held:
        attempts = {a.number: a for a in Attempt.select().where(Attempt.job_id == job_id)}
        if attempts[number].error_type not in ("LeaseExpired", "Released"):
            continue  # its outcome reached the database just before the cut
        figures.cut_off += 1
        figures.reaped_s = max(figures.reaped_s, attempts[number].finished_at - cut_at)
        later = attempts.get(number + 1)
        if later is None:
            if Job.get_by_id(job_id).status == "dead":
                figures.recovered += 1
            else:
                figures.problems.append(f"job {job_id}: attempt {number} expired on {host} "
                                        f"and nothing came of it")
            continue
        expiry = renewed[job_id] + SHORT_LEASE["LEASE_S"]
        if later.host == host or later.started_at < expiry:
            figures.problems.append(
                f"job {job_id}: attempt {number} cut off on {host}, attempt {number + 1} began "
                f"on {later.host} {later.started_at - cut_at:.2f}s after the cut (its lease "
                f"expired {expiry - cut_at:.2f}s after it)")
            continue
        figures.recovered += 1
        recoveries.append(later.started_at - cut_at)
    if recoveries:
        figures.first_recovery_s, figures.recovery_s = min(recoveries), max(recoveries)


@contextlib.contextmanager
def _served(conveyor, figures, effects_log, supervisors, concurrency, api_threads, lease,
            web_env=None):
    """Supervisors and a real gunicorn, with an ApiProbe submitting through it, for a
    scenario that faults the database under them: yields (the probe, a function that says
    which of the processes started here are gone), and stops them all however the scenario
    ends, their problems added to figures."""
    pool = start_pool(conveyor, supervisors, concurrency, **lease)
    workers_before = {pid for supervisor in pool for pid in supervisor.worker_pids()}
    web = Gunicorn({**conveyor.env, **(web_env or {})}, conveyor.tmp_path / "gunicorn.log")
    key = conveyor.flask("keys", "create", "probe", "--admin", "--rate-limit",
                         "100000/second").stdout.strip()
    web_pids = {web.pid, *web.worker_pids()}
    api = ApiProbe(web.url, key, effects_log, api_threads)
    try:
        yield api, lambda: replaced(pool, workers_before, web, web_pids)
    finally:
        figures.problems += api.stop()
        web.stop()
        figures.problems += stop_pool(pool)


def database_restarts(conveyor, cluster, jobs, seed, modes=("fast", "immediate"),
                      supervisors=2, concurrency=4, api_threads=3):
    """Restart the (private) PostgreSQL server during the run, once per mode. Supervisors
    and a real gunicorn keep running: the workers finish the jobs without a restart, and
    every API answer meanwhile is 2xx or 503 with Retry-After."""
    rng, started = random.Random(seed), time.monotonic()
    figures = Figures("database-restarts", "postgres", seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    with _served(conveyor, figures, effects_log, supervisors, concurrency, api_threads,
                 LONG_LEASE) as (api, replaced_all):
        ids = submit_chaos(conveyor, jobs, effects_log)
        for index, mode in enumerate(modes):
            wait_done_fraction(len(ids), (index + 1) / (len(modes) + 1))
            before = api.answers()
            cluster.restart(mode)
            figures.restarts += 1
            time.sleep(rng.uniform(1.0, 2.0))
            if api.answers() - before < 10:
                figures.problems.append(f"the API was not probed during the {mode} restart")
        figures.problems += api.stop()
        figures.problems += api.serves_again()
        api.settle()
        drain(timeout_s=max(600, jobs / 3))
        figures.problems += replaced_all()
    figures.seconds = time.monotonic() - started
    check(conveyor, figures, effects_log)
    figures.problems += api.problems()
    figures.api_answers = dict(api.statuses)
    return figures


def replaced(pool, workers_before, web, web_pids):
    """What was restarted or replaced of the supervisors, their workers and the web
    processes (by their pids before the fault), or logged a traceback."""
    found = [f"supervisor {supervisor.pid} exited {supervisor.proc.returncode}"
             for supervisor in pool if supervisor.proc.poll() is not None]
    workers_after = {pid for supervisor in pool for pid in supervisor.worker_pids()}
    if workers_after != workers_before:
        found.append(f"worker processes were replaced: "
                     f"{sorted(workers_before - workers_after)} gone")
    if {web.pid, *web.worker_pids()} != web_pids:
        found.append("the web processes were replaced")
    if "Traceback" in web.log():
        found.append(f"gunicorn logged a traceback: {web.log()[-2000:]}")
    return found


# Long enough that no lease expires while the standby is promoted and every process
# reconnects (a few seconds), short enough that a claim committed on the standby whose
# answer the worker never got (the primary died first) is reaped soon.
FAILOVER_LEASE = {"LEASE_S": 8}
GRACE_S = 2.0  # SPEC §13: no request refused more than this after the database answers


def failover_url(primary, standby, database):
    """libpq's multi-host URL of database on both servers, the standby first: libpq passes
    it over while it is read-only (target_session_attrs=read-write), and takes it once
    promoted."""
    return (f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/"
            f"{database}?target_session_attrs=read-write")


def failover(conveyor, primary, standby, seed, supervisors=2, concurrency=2, api_threads=3,
             before=60, after_s=3.0):
    """kill -9 the primary under load and promote its synchronous standby; conveyor's
    DATABASE_URL names both (libpq's multi-host URL, target_session_attrs=read-write).
    Supervisors and a real gunicorn go on without a restart: every submission answered 2xx
    is in the promoted database and runs once, no handler ends twice, and no submission
    sent GRACE_S after the promotion is refused. Measures the time from the promotion to
    the first job started and to the first submission accepted after it (from `pg_ctl
    promote`: the server may take writes a moment before pg_ctl sees it done)."""
    started = time.monotonic()
    figures = Figures("failover", "postgres", seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    # Chaos jobs fail one attempt in ten: with ten attempts every accepted one succeeds.
    with _served(conveyor, figures, effects_log, supervisors, concurrency, api_threads,
                 FAILOVER_LEASE, web_env={"DEFAULT_MAX_ATTEMPTS": "10"}) as (api, replaced_all):
        wait_for(lambda: len(api.accepted()) >= before and _effects(effects_log, "end"), 60,
                 interval=0.05, message=f"{before} submissions accepted, and runs, before the "
                                        f"failover")
        killed_at = time.time()
        primary.kill()
        # What workers claimed before the kill they still run; once it is all run, every
        # job started is claimed on the promoted server.
        wait_for(lambda: _quiet(effects_log, 0.3), 30, interval=0.05,
                 message="the jobs claimed before the kill to be run")
        promoting_at = time.time()
        standby.promote()
        promoted_at = time.time()  # pg_ctl saw it done: the database answers from here on
        figures.failovers += 1
        wait_for(lambda: time.time() > promoted_at + after_s and
                 len(api.accepted(since=promoted_at)) >= before, 60, interval=0.05,
                 message=f"{before} submissions accepted after the promotion")
        figures.problems += api.stop()
        figures.problems += api.serves_again()
        api.settle()
        drain(timeout_s=120, quiet_s=30)
        wait_for(lambda: retrying(_listening) == supervisors, 15, interval=0.1,
                 message=f"the {supervisors} supervisors to LISTEN on the promoted server")
        figures.problems += replaced_all()
    figures.seconds = time.monotonic() - started
    check(conveyor, figures, effects_log, acknowledged=[s.job_id for s in api.accepted()])
    figures.problems += api.problems()
    figures.api_answers = dict(api.statuses)
    figures.problems += _failover_problems(conveyor, api, effects_log, killed_at, promoted_at)
    starts = [at for at in _effects(effects_log, "start") if at > promoting_at]
    answers = [s.answered_at for s in api.accepted(since=promoting_at)
               if s.sent_at > promoting_at]
    refused = [s.answered_at for s in api.submissions if s.job_id is None]
    figures.timings = {"kill": promoting_at - killed_at, "promote": promoted_at - promoting_at,
                       "promote_to_first_start": min(starts, default=math.inf) - promoting_at,
                       "promote_to_first_201": min(answers, default=math.inf) - promoting_at,
                       "promoted_to_last_503": max(refused, default=math.nan) - promoted_at}
    return figures


def _failover_problems(conveyor, api, effects_log, killed_at, promoted_at):
    from models import Job
    found = []
    statuses = dict(retrying(lambda: list(Job.select(Job.id, Job.status).tuples())))
    unfinished = [s.job_id for s in api.accepted() if statuses.get(s.job_id) != "succeeded"]
    if unfinished:
        found.append(f"lost: accepted jobs not succeeded: "
                     f"{[(i, statuses.get(i)) for i in unfinished[:10]]}")
    ends = defaultdict(set)
    for job_id, attempt in _effects(effects_log, "end", fields=(1, 2)):
        ends[job_id].add(attempt)
    twice = {job_id: sorted(attempts) for job_id, attempts in ends.items() if len(attempts) > 1}
    if twice:
        found.append(f"succeeded twice (handler ended in several attempts): {twice}")
    refused = [s for s in api.submissions if s.sent_at >= promoted_at + GRACE_S
               and not 200 <= (s.status or 0) < 300]
    if refused:
        found.append(f"{len(refused)} submissions sent {GRACE_S:g}s after the promotion were "
                     f"refused: {refused[:5]}")
    if not [s for s in api.submissions if killed_at < s.answered_at < promoted_at
            and s.status == 503]:
        found.append("no submission was refused between the kill and the promotion: the "
                     "failover was not under load")
    return found


def _listening():
    """How many sessions of this database LISTEN for new jobs (the supervisors')."""
    from models import db
    return db.execute_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                          "current_database() AND query LIKE 'LISTEN %%'").fetchone()[0]


def _quiet(effects_log, for_s):
    """Whether no handler runs and none started or ended in the last for_s seconds."""
    lines = side_effects(effects_log)
    began = {tuple(line[1:3]) for line in lines if line[0] == "start"}
    ended = {tuple(line[1:3]) for line in lines if line[0] != "start"}
    last = max((float(line[4]) for line in lines), default=0.0)
    return began <= ended and time.time() - last > for_s


def _effects(effects_log, event, fields=(4,)):
    """From the side-effect log, the given fields of each `event` line (float times by
    default; ints for the others)."""
    picked = []
    for line in side_effects(effects_log):
        if line[0] == event:
            values = [float(line[i]) if i == 4 else int(line[i]) for i in fields]
            picked.append(values[0] if len(values) == 1 else tuple(values))
    return picked



class ApiProbe:
    """Threads that call the API of a live gunicorn without pause: health, a job page and a
    submission with an Idempotency-Key. Every answer must be 2xx, or 503 with Retry-After;
    a 503'd submission is sent again later with the same key, and must make one job."""

    def __init__(self, url, key, effects_log, threads):
        self.url, self.key, self.effects_log = url, key, effects_log
        self.statuses = defaultdict(int)
        self.failures = []
        self.pending = []  # idempotency keys whose submission got no 2xx
        self.sent = []
        self.submissions = []  # Submission, each answer (or none) of each one sent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe, args=(i,), daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def answers(self):
        return sum(self.statuses.values())

    def _call(self, session, method, path, **kwargs):
        try:
            response = session.request(method, self.url + path, timeout=30,
                                       headers={"Authorization": f"Bearer {self.key}",
                                                **kwargs.pop("headers", {})}, **kwargs)
        except requests.RequestException as exc:
            with self._lock:
                self.failures.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self.statuses[response.status_code] += 1
            if not (200 <= response.status_code < 300 or (
                    response.status_code == 503 and response.headers.get("Retry-After"))):
                self.failures.append(f"{method} {path}: {response.status_code} "
                                     f"{response.text[:300]}")
        return response

    def _probe(self, index):
        session = requests.Session()
        count = 0
        while not self._stop.is_set():
            count += 1
            self._call(session, "GET", "/healthz")
            key = f"probe-{index}-{count}"
            response = self._submit(session, key)
            with self._lock:
                self.sent.append(key)
                if response is None or response.status_code >= 300:
                    self.pending.append(key)
            if response is not None and response.status_code in (200, 201):
                self._call(session, "GET", f"/v1/jobs/{response.json()['id']}")
            time.sleep(0.02)

    def _submit(self, session, key):
        sent_at = time.time()
        response = self._call(session, "POST", "/v1/jobs", headers={"Idempotency-Key": key},
                              json={"type": "t.chaos", "payload": {"log": self.effects_log}})
        status = response.status_code if response is not None else None
        job_id = response.json()["id"] if status in (200, 201) else None
        with self._lock:
            self.submissions.append(Submission(key, sent_at, time.time(), status, job_id))
        return response

    def accepted(self, since=0.0):
        """The submissions answered 2xx (after `since`, a time.time())."""
        with self._lock:
            return [s for s in self.submissions if s.job_id is not None and s.answered_at > since]

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return []

    def serves_again(self):
        """The same web process answers 2xx again, without having been restarted."""
        session = requests.Session()
        found = []
        for path in ("/healthz", "/v1/stats", "/v1/jobs?limit=5"):
            response = self._call(session, "GET", path)
            if response is None or response.status_code != 200:
                found.append(f"api: GET {path} after the restarts: "
                             f"{response.status_code if response is not None else 'no answer'}")
        return found

    def settle(self):
        """Send every unanswered submission again, with its key, until it is accepted."""
        session = requests.Session()
        for key in self.pending:
            for _ in range(50):
                response = self._submit(session, key)
                if response is not None and response.status_code in (200, 201):
                    break
                time.sleep(0.2)

    def problems(self):
        from models import Job
        found = []
        if self.statuses.get(503, 0) == 0:
            found.append("the API never answered 503: the outage was not seen")
        if self.failures:
            found.append(f"api: {len(self.failures)} bad answers of {self.answers()} "
                         f"(statuses {dict(self.statuses)}), first ones:")
            found += [f"api: {failure}" for failure in self.failures[:20]]
        keys = retrying(lambda: list(Job.select(Job.idempotency_key)
                                     .where(Job.idempotency_key.is_null(False)).tuples()))
        counts = defaultdict(int)
        for (key,) in keys:
            counts[key] += 1
        missing = [key for key in self.sent if counts.get(key) != 1]
        if missing:
            found.append(f"api: submissions without exactly one job: {missing[:10]}")
        return found


@dataclass
class Submission:
    key: str  # its Idempotency-Key
    sent_at: float  # time.time()
    answered_at: float
    status: int = None  # None: no answer
    job_id: int = None  # when answered 2xx


def sqlite_kills(conveyor, seconds, seed, kill_every_s=0.1, writers=3, supervisors=2,
                 concurrency=4):
    """Many processes write one SQLite file (workers, supervisors, submitters) while a
    random one is killed -9 every ~kill_every_s. Then the file must pass integrity_check
    and `flask audit`, hold every acknowledged job, and a fresh supervisor finish them."""
    rng, started = random.Random(seed), time.monotonic()
    figures = Figures("sqlite-kills", "sqlite", seed)
    effects_log = str(conveyor.tmp_path / "effects.log")
    acks = str(conveyor.tmp_path / "acks.log")
    pool = start_pool(conveyor, supervisors, concurrency, **LONG_LEASE)
    feeders = [Submitter(conveyor, effects_log, acks) for _ in range(writers)]

    def kill_a_writer():
        kind = rng.random()
        if kind < 0.2:
            index = rng.randrange(len(feeders))
            feeders[index].kill_group()
            feeders[index] = Submitter(conveyor, effects_log, acks)
        elif kind < 0.3:
            index = rng.randrange(len(pool))
            pool[index].kill_host()
            pool[index] = conveyor.start_supervisor(concurrency=concurrency, **LONG_LEASE)
            figures.restarts += 1
        else:
            victims = [pid for supervisor in pool for pid in supervisor.worker_pids()]
            if not victims:
                return
            _kill(rng.choice(victims), signal.SIGKILL)
        figures.kills += 1
    chaos = ChaosLoop(kill_a_writer, kill_every_s, rng)
    try:
        time.sleep(seconds)
    finally:
        figures.problems += chaos.stop()
        for feeder in feeders:
            feeder.kill_group()
        for supervisor in pool:
            supervisor.kill_host()  # the last kill of all, wherever each process was
    path = conveyor.database_url[len("sqlite:///"):]
    figures.problems += [f"integrity_check: {row}" for row in integrity_problems(path)]
    audit = conveyor.flask("audit", check=False)
    if audit.returncode != 0:
        figures.problems.append(f"flask audit right after the kills: {audit.stdout[-2000:]}"
                                f"{audit.stderr[-1000:]}")
    survivor = conveyor.start_supervisor(concurrency=concurrency, **SHORT_LEASE)
    try:
        drain(timeout_s=600)
    finally:
        figures.problems += stop_pool([survivor])
    figures.seconds = time.monotonic() - started
    return check(conveyor, figures, effects_log, acknowledged=_acknowledged(acks))


class Submitter:
    """A process that enqueues batches of t.chaos jobs forever, and appends the ids of each
    committed batch to an acknowledgement log."""

    def __init__(self, conveyor, effects_log, acks):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "submitter.py")
        self.process = ProcessGroup([sys.executable, script, effects_log, acks], conveyor.env,
                                    conveyor.tmp_path / "submitters.log")

    def kill_group(self):
        self.process.kill_group()


def _acknowledged(acks):
    if not os.path.exists(acks):
        return []
    with open(acks) as f:
        return [int(job_id) for line in f if line.endswith("\n") for job_id in line.split()]


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _backend(conveyor):
    if conveyor.env.get("DATABASE_POOL_MODE") == "transaction":
        return "pgbouncer"
    return "postgres" if conveyor.is_postgres else "sqlite"

