"""Job types under limits, for tests/test_flow.py. Each appends "start|end JOB ATTEMPT TIME"
to the side-effect log its payload names: the record the limits are checked against."""
import os
import time

from handlers import handler


def record(payload, ctx, event):
    line = f"{event} {ctx.job_id} {ctx.attempt} {time.time():.6f}\n"
    fd = os.open(payload["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run(payload, ctx):
    record(payload, ctx, "start")
    time.sleep(payload.get("s", 0))
    record(payload, ctx, "end")


@handler("flow.capped", concurrency=3)
def capped(payload, ctx):
    run(payload, ctx)


@handler("flow.rated", rate="20/second")
def rated(payload, ctx):
    run(payload, ctx)


@handler("flow.serial", group_concurrency=1)
def serial(payload, ctx):
    run(payload, ctx)


@handler("flow.free")
def free(payload, ctx):
    run(payload, ctx)
