"""Job types that report progress (tests/test_progress.py), steered by their payloads."""
import os
import time

from handlers import handler

UNSERIALISABLE = {"object": object(), "nan": float("nan"), "set": {1, 2}}


def wait_for_gate(path, max_s=60):
    deadline = time.monotonic() + max_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@handler("t.progress")
def report_progress(payload, ctx):
    """Report {"done": i, "total": n} for i in 0..n-1, spread over payload["over_s"]
    seconds (as fast as it can when 0); then each of payload["values"]; then, given a
    payload["gate"], wait until "<gate>.<attempt>" exists (checks.release) and report each
    of payload["after"].
    payload["bad"] names a value that is not JSON to report first."""
    if "bad" in payload:
        ctx.progress(UNSERIALISABLE[payload["bad"]])
    n, over_s = payload.get("n", 0), payload.get("over_s", 0)
    started = time.monotonic()
    for i in range(n):
        if over_s and i % 100 == 0:
            time.sleep(max(0.0, started + over_s * i / n - time.monotonic()))
        ctx.progress({"done": i, "total": n})
    for value in payload.get("values", []):
        ctx.progress(value)
    if "gate" in payload:
        wait_for_gate(f"{payload['gate']}.{ctx.attempt}")
        for value in payload.get("after", []):
            ctx.progress(value)
    return {"reported": n, "took_s": time.monotonic() - started}
