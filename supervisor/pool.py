"""The supervisor: forks worker processes, watches them, and runs the background duties.

Single-threaded on purpose (forking is only safe so). Each tick it collects exited
children and records what they held at once, without waiting for the lease (the attempt
whose handler was running `crashed`, the claimed jobs it had not begun released),
kills an attempt past its timeout or whose job was cancelled, respawns workers (backing
off when one keeps dying) and runs its duties: reap expired leases, stage due jobs,
fire due schedules, deliver callbacks (in a child: supervisor/callbacks.py), flush
metrics, forget dead workers, prune old history. On SIGTERM
it stops claiming, lets running attempts finish within SHUTDOWN_GRACE_S, then kills the
rest and records them `interrupted`.
"""
import logging
import os
import random
import selectors
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from core import status as states
from core.policy import Outcome
from core import history, jobs, schedules, submission, times, workers
from core import callbacks
from infra import metrics
from models import DB_ERRORS, reset_connection
from models import is_postgres
from supervisor import slots
from supervisor.callbacks import CallbackSender
from supervisor.wakeups import LISTEN_ERRORS, Listener, WakePipe, wake_for
from supervisor.worker import WorkerProcess

log = logging.getLogger("conveyor.supervisor")

TICK_S = 0.1
# A worker dying sooner than this after its start, without finishing an attempt, counts
# toward a crash loop; one that finished attempts in between was killed, not looping.
CRASH_WINDOW_S = 30.0
MAX_RESPAWN_DELAY_S = 30.0
SCHEDULER_INTERVAL_S = 0.5  # well under a second, so even per-second schedules miss no slot
CALLBACKS_INTERVAL_S = 0.5  # how soon a due callback gets a sender
COUNTS_INTERVAL_S = 60.0  # folding the job counts of ended sessions (core.history)


@dataclass
class Duty:
    """A background chore run every interval_s (with jitter, so supervisors spread out)."""
    name: str
    interval_s: float
    fn: Callable[[], object]
    next_at: float = 0.0

    def run_if_due(self, now_m):
        if now_m < self.next_at:
            return
        self.next_at = now_m + self.interval_s * random.uniform(0.9, 1.1)
        try:
            self.fn()
        except DB_ERRORS as exc:
            log.warning("%s: database unavailable: %s", self.name, str(exc).strip()[:200])
            reset_connection()
        except Exception:
            log.exception("%s failed", self.name)


@dataclass
class Child:
    pid: int
    worker: workers.WorkerInfo
    slot_index: int
    started_m: float
    slot_writes: int = 0                   # the slot's write count when it started
    stop_reason: Optional[str] = None      # why we killed it: timeout, cancel or shutdown
    running: Optional[slots.Running] = None


@dataclass
class SlotState:
    slot: slots.Slot
    pipe: WakePipe = field(default_factory=WakePipe)  # kept across respawns of the slot
    pid: Optional[int] = None
    failures: int = 0
    respawn_at: float = 0.0


class Supervisor:
    def __init__(self, settings, concurrency, queues):
        self.settings = settings
        self.rules = submission.Rules.from_settings(settings)  # how a fired schedule's job is checked
        self.queues = tuple(queues)
        self.id = f"s-{uuid.uuid4().hex[:12]}"
        self.host = socket.gethostname()
        self.slots = [SlotState(slot) for slot in slots.allocate(concurrency)]
        self.children: dict[int, Child] = {}
        self.stopping = False
        self.hurry = False
        self.sender_pid = None  # the child delivering callbacks, while one runs
        self.listener = Listener(jobs.NOTIFY_CHANNEL, settings.listen_database_url) \
            if is_postgres() else None
        self.duties = [
            Duty("reaper", settings.heartbeat_s, lambda: jobs.reap_expired(settings.lease_s)),
            Duty("metrics", settings.heartbeat_s, metrics.flush),
            Duty("stager", 1.0, jobs.stage_due),
            Duty("expirer", 1.0, jobs.expire_due),
            Duty("limits", 1.0, jobs.sync_held),
            Duty("scheduler", SCHEDULER_INTERVAL_S, self._fire_schedules),
            Duty("cancellations", 0.5, self._stop_cancelled),
            Duty("callbacks", CALLBACKS_INTERVAL_S, self._send_callbacks),
            Duty("counts", COUNTS_INTERVAL_S, history.fold_counts),
            Duty("worker registry", settings.lease_s,
                 lambda: workers.forget_stale_workers(settings.lease_s)),
        ]
        if self.listener is not None:
            self.duties.append(Duty("listener", 1.0, self._listen))
        if settings.retention_days > 0:
            self.duties.append(Duty("pruner", 3600.0, self._prune,
                                    next_at=time.monotonic() + 60.0))

    # ------------------------------------------------------------------ main loop

    def run(self):
        self._install_signals()
        log.info("supervisor %s starting %d workers (queues: %s)", self.id, len(self.slots),
                 ",".join(self.queues) or "all")
        while not self.stopping:
            self._spawn_due()
            self._wait(TICK_S)
            self._collect_exits()
            self._enforce_timeouts()
            now_m = time.monotonic()
            for duty in self.duties:
                duty.run_if_due(now_m)
        self._shutdown()
        return 0

    def _install_signals(self):
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum, _frame):
        if self.stopping:
            self.hurry = True  # a second signal: do not wait out the grace period
        self.stopping = True

    def _wait(self, timeout):
        for key, _ in self._selector.select(timeout):
            if key.fileobj == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._wake_workers()

    # ------------------------------------------------------------------ wake-ups

    def _listen(self):
        """(Re)connect the LISTEN connection; until it is up, workers poll."""
        if self.listener.connected or self.stopping:
            return
        try:
            self._selector.register(self.listener.connect(), selectors.EVENT_READ)
        except LISTEN_ERRORS as exc:
            self.listener.close()
            log.warning("cannot listen for new jobs, polling every %gs until it can: %s",
                        self.settings.poll_interval_s, str(exc).strip()[:200])
            return
        log.debug("listening for new jobs on %s", self.listener.channel)
        self._wake_all()  # jobs announced while we were deaf are claimable now

    def _wake_workers(self):
        try:
            counts = self.listener.announced()
        except LISTEN_ERRORS as exc:
            log.warning("lost the connection that listens for new jobs; polling until it is "
                        "back: %s", str(exc).strip()[:200])
            self._unlisten()
            return
        if counts:
            wake_for(counts, self.queues, self._live_slots())

    def _wake_all(self):
        for slot, pipe in self._live_slots():
            pipe.wake()

    def _live_slots(self):
        return [(state.slot, state.pipe) for state in self.slots if state.pid is not None]

    def _unlisten(self):
        if self.listener is not None and self.listener.connected:
            try:
                self._selector.unregister(self.listener.fd)
            except (KeyError, ValueError):
                pass
            self.listener.close()

    # ------------------------------------------------------------------ children

    def _spawn_due(self):
        now_m = time.monotonic()
        for index, state in enumerate(self.slots):
            if state.pid is None and now_m >= state.respawn_at:
                self._spawn(index)

    def _spawn(self, index):
        worker = workers.WorkerInfo(id=f"w-{uuid.uuid4().hex[:12]}", supervisor_id=self.id,
                                 host=self.host, pid=0, queues=self.queues)
        state = self.slots[index]
        state.slot.clear()
        pid = self._fork(lambda: WorkerProcess(replace(worker, pid=os.getpid()), state.slot,
                                               state.pipe, self.settings).run(),
                         f"worker {worker.id}")
        state.pid = pid
        self.children[pid] = Child(pid, replace(worker, pid=pid), index, time.monotonic(),
                                   state.slot.writes())
        log.debug("worker %s started (pid %d)", worker.id, pid)

    def _fork(self, main, name):
        """Fork a child that runs main() and exits with what it returns (1 if it raises);
        the child's pid."""
        reset_connection()  # a child must never share the parent's database connection
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._become_child()
                code = main()
            except BaseException:
                log.exception("%s failed", name)
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    def _become_child(self):
        metrics.reset()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._selector.close()
        if self.listener is not None and self.listener.connected:
            os.close(self.listener.fd)  # the parent's socket: never ours to use
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _collect_exits(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._on_exit(child, status)
            elif pid == self.sender_pid:
                self._on_sender_exit(status)

    def _on_exit(self, child, status):
        state = self.slots[child.slot_index]
        state.pid = None
        running = child.running or state.slot.read()
        outcome = self._outcome_of(child, running, status)
        ended = self._end_attempts(child, outcome, running)
        crashed = child.stop_reason is None and (status != 0 or ended)
        if crashed:
            log.warning("worker %s (pid %d) died: %s", child.worker.id, child.pid,
                        outcome.error_message,
                        extra={"job_id": running.job_id} if running else {})
        if self.stopping:
            return
        now_m = time.monotonic()
        if not crashed:
            state.failures, state.respawn_at = 0, now_m
            return
        finished_one = state.slot.writes() - child.slot_writes >= 2  # a start, then a clear
        looping = now_m - child.started_m < CRASH_WINDOW_S and not finished_one
        state.failures = state.failures + 1 if looping else 1
        delay = 0.0 if state.failures <= 1 else min(MAX_RESPAWN_DELAY_S, 2.0 ** (state.failures - 2))
        if delay:
            log.warning("worker slot %d keeps dying (%d times in a row); restarting in %.0fs",
                        child.slot_index, state.failures, delay)
        state.respawn_at = now_m + delay

    def _outcome_of(self, child, running, status):
        if child.stop_reason == "timeout":
            limit = f" of {running.timeout_s:g}s" if running else ""  # a torn slot tells nothing
            return Outcome(states.TIMED_OUT, error_type="Timeout",
                                error_message=f"attempt ran past its timeout{limit} and was killed")
        if child.stop_reason == "cancel":
            return Outcome(states.CANCELLED, error_type="Cancelled",
                                error_message="cancelled while running; the worker was stopped")
        if child.stop_reason == "shutdown":
            return Outcome(states.INTERRUPTED, error_type="Interrupted",
                                error_message=f"still running {self.settings.shutdown_grace_s:g}s "
                                              f"after shutdown began; killed")
        return Outcome(states.CRASHED, error_type="WorkerDied",
                            error_message=f"worker process {child.pid} {describe_exit(status)}")

    def _end_attempts(self, child, outcome, running):
        """The attempt whose handler was running ends with outcome; the jobs the worker
        had claimed but not begun go back at once, their attempt budget intact."""
        try:
            ended = jobs.end_attempts(child.worker.id, outcome,
                                      running.job_id if running else None)
            workers.deregister_worker(child.worker.id)
            return ended
        except DB_ERRORS as exc:
            # The lease will expire and any supervisor's reaper will record it.
            log.warning("could not record the end of worker %s: %s", child.worker.id,
                        str(exc).strip()[:200])
            reset_connection()
            return []

    def _kill(self, child, reason):
        if child.stop_reason is not None:
            return
        child.stop_reason = reason
        child.running = self.slots[child.slot_index].slot.read()
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _enforce_timeouts(self):
        now_m = time.monotonic()
        for child in list(self.children.values()):
            running = self.slots[child.slot_index].slot.read()
            if running is not None and now_m > running.deadline:
                log.warning("attempt timed out after %gs; killing worker %s", running.timeout_s,
                            child.worker.id, extra={"job_id": running.job_id})
                self._kill(child, "timeout")

    # ------------------------------------------------------------------ duties

    def _fire_schedules(self):
        for run in schedules.fire_due(rules=self.rules):
            log.info("schedule %s: slot %s %s%s", run.schedule_name,
                     times.timestamp(run.slot), run.outcome,
                     f" ({run.reason})" if run.reason else "",
                     extra={"job_id": run.job_id} if run.job_id else {})

    def _stop_cancelled(self):
        busy = {child.worker.id: child for child in self.children.values()
                if self.slots[child.slot_index].slot.read() is not None}
        for job in jobs.cancellations(busy):
            log.info("job %d cancelled while running; stopping worker %s", job.id, job.lease_owner,
                     extra={"job_id": job.id})
            self._kill(busy[job.lease_owner], "cancel")

    def _send_callbacks(self):
        """Fork a sender (supervisor/callbacks.py) when callbacks are due and none runs: a
        slow receiver then holds the sender, never this loop."""
        if self.sender_pid is not None or self.stopping or not callbacks.any_due():
            return
        self.sender_pid = self._fork(lambda: CallbackSender(self.settings, self.id).run(),
                                     "callback sender")
        log.debug("callback sender started (pid %d)", self.sender_pid)

    def _on_sender_exit(self, status):
        self.sender_pid = None
        if status != 0:  # what it held is due again when its lease is over
            log.warning("callback sender %s", describe_exit(status))

    def _prune(self):
        removed = history.prune(self.settings.retention_days * 86400)
        schedules.prune_runs(self.settings.retention_days * 86400)
        metrics.retire_stale(86400)
        if removed:
            log.info("pruned %d finished jobs older than %g days", removed,
                     self.settings.retention_days)

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self):
        self._unlisten()
        grace = self.settings.shutdown_grace_s
        log.info("shutting down: stopping %d workers, waiting up to %gs for running attempts",
                 len(self.children), grace)
        for child in self.children.values():
            _signal(child.pid, signal.SIGTERM)
        if self.sender_pid is not None:
            _signal(self.sender_pid, signal.SIGTERM)  # it ends the batch under way, then leaves
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline and not self.hurry:
            self._wait(TICK_S)
            self._collect_exits()
            self._enforce_timeouts()
        for child in list(self.children.values()):
            self._kill(child, "shutdown")
        while self.children:
            pid, status = os.waitpid(-1, 0)
            child = self.children.pop(pid, None)
            if child is not None:
                self._on_exit(child, status)
        Duty("metrics", 0, metrics.flush).run_if_due(time.monotonic())
        log.info("supervisor %s stopped", self.id)


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def describe_exit(status):
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"was killed by signal {signum} ({signal.Signals(signum).name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
