"""`bench.capped` and `bench.rated`: the no-op job under a limit (SPEC §11), for
`python -m bench.drain --type capped|rated`. Each is registered only when its limit is in
the environment the bench gives the supervisor and itself (BENCH_CONCURRENCY,
BENCH_RATE), so that every other benchmark runs with no limited type at all."""
import os
import time

from bench.common import stamp
from handlers import handler


def noop(payload, ctx):
    stamp(payload.get("n", 0), time.time())


if os.environ.get("BENCH_CONCURRENCY"):
    handler("bench.capped", concurrency=int(os.environ["BENCH_CONCURRENCY"]))(noop)
if os.environ.get("BENCH_RATE"):
    handler("bench.rated", rate=os.environ["BENCH_RATE"])(noop)
