"""Job types for the test suite, steered by their payloads.

Handlers that take `log` append one line per event to that file (a side-effect log the
tests read): "<event> <job_id> <attempt> <pid> <time>". One short write with O_APPEND
is atomic, so lines from concurrent workers never interleave.
"""
import os
import random
import signal
import time

from handlers import Permanent, RetryAfter, handler


def record(payload, ctx, event):
    path = payload.get("log")
    if path:
        line = f"{event} {ctx.job_id} {ctx.attempt} {os.getpid()} {time.time():.6f}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def follow_up(payload, ctx):
    """Ask for the follow-up jobs payload["followups"] names: a count of jobs of type
    payload["followup_type"] (default t.noop) logging to the same side-effect log, or a
    list of {"type", "payload", "options"} (SPEC §12: made only if the attempt succeeds)."""
    followups = payload.get("followups", [])
    if isinstance(followups, int):
        log = {"log": payload["log"]} if payload.get("log") else {}
        followups = [{"type": payload.get("followup_type", "t.noop"),
                      "payload": {**log, "parent": ctx.job_id, "i": i}}
                     for i in range(followups)]
    for child in followups:
        ctx.enqueue(child["type"], child.get("payload", {}), **child.get("options", {}))


@handler("t.noop")
def noop(payload, ctx):
    record(payload, ctx, "run")
    return {"job": ctx.job_id}


@handler("t.sleep")
def sleep(payload, ctx):
    """Record start, sleep payload["s"] seconds, record end."""
    record(payload, ctx, "start")
    time.sleep(payload.get("s", 0))
    record(payload, ctx, "end")
    return {"slept": payload.get("s", 0)}


@handler("t.wait_file")
def wait_file(payload, ctx):
    """Record start, then block until payload["file"] exists (the test's go signal)."""
    record(payload, ctx, "start")
    deadline = time.monotonic() + payload.get("max_s", 60)
    while not os.path.exists(payload["file"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    record(payload, ctx, "end")
    return {"waited": True}


@handler("t.fail")
def fail(payload, ctx):
    record(payload, ctx, "run")
    raise ValueError(payload.get("message", "boom"))


@handler("t.flaky")
def flaky(payload, ctx):
    """Fail until attempt payload["succeed_on"]."""
    record(payload, ctx, "run")
    if ctx.attempt < payload.get("succeed_on", 2):
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@handler("t.permanent")
def permanent(payload, ctx):
    record(payload, ctx, "run")
    raise Permanent(payload.get("message", "card declined"))


@handler("t.retry_after")
def retry_after(payload, ctx):
    record(payload, ctx, "run")
    if ctx.attempt < payload.get("succeed_on", 2):
        raise RetryAfter(payload.get("s", 1.0))
    return {"attempt": ctx.attempt}


@handler("t.crash")
def crash(payload, ctx):
    """Kill our own worker process, on every attempt or until payload["succeed_on"]."""
    record(payload, ctx, "run")
    follow_up(payload, ctx)
    if ctx.attempt < payload.get("succeed_on", 10 ** 9):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"attempt": ctx.attempt}


@handler("t.bad_result")
def bad_result(payload, ctx):
    return {"when": object()}


@handler("t.step")
def step(payload, ctx):
    """A side effect in ctx.step, then a failure on attempts before payload["succeed_on"]."""
    charge = ctx.step("charge", lambda: record(payload, ctx, "charge") or {"charged": ctx.attempt})
    record(payload, ctx, "run")
    if ctx.attempt < payload.get("succeed_on", 2):
        raise RuntimeError("failed after the charge")
    return charge


def chaos_plan(job_id, attempt):
    """(seconds to sleep, whether to fail) for attempt `attempt` of a t.chaos job: 0-50 ms,
    and a failure about one time in ten, decided by the job and attempt alone."""
    draw = random.Random(f"{job_id}:{attempt}")
    return draw.uniform(0, 0.05), draw.random() < 0.10


@handler("t.chaos")
def chaos(payload, ctx):
    """The fault-injection workload (tests/faults/): record start, work 0-50 ms, then
    record end and return, or record fail and raise, as chaos_plan says."""
    sleep_s, fails = chaos_plan(ctx.job_id, ctx.attempt)
    record(payload, ctx, "start")
    follow_up(payload, ctx)
    time.sleep(sleep_s)
    if fails:
        record(payload, ctx, "fail")
        raise RuntimeError(f"chaos failure of job {ctx.job_id} attempt {ctx.attempt}")
    record(payload, ctx, "end")
    return {"attempt": ctx.attempt}


@handler("t.schema", schema={"type": "object", "required": ["to"],
                             "properties": {"to": {"type": "string"}}})
def with_schema(payload, ctx):
    return {"to": payload["to"]}


@handler("t.ctx")
def context(payload, ctx):
    return {"job_id": ctx.job_id, "attempt": ctx.attempt, "max_attempts": ctx.max_attempts,
            "queue": ctx.queue, "idempotency_key": ctx.idempotency_key}


@handler("t.gate")
def gate(payload, ctx):
    """Hold the attempts listed in payload["hold"] (default [1]) until the file
    "<payload["gate"]>.<attempt>" exists, fail attempts before payload["succeed_on"]
    (default 1), and say which attempt and process produced the result."""
    record(payload, ctx, "start")
    follow_up(payload, ctx)
    if ctx.attempt in payload.get("hold", [1]):
        release = f"{payload['gate']}.{ctx.attempt}"
        deadline = time.monotonic() + payload.get("max_s", 120)
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    record(payload, ctx, "end")
    if ctx.attempt < payload.get("succeed_on", 1):
        raise RuntimeError(f"gate failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt, "pid": os.getpid()}
