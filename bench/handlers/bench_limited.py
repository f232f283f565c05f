"""`bench.capped` and `bench.rated`: the no-op job under a limit (SPEC §11), for
`python -m bench.drain --type capped|rated`. The limit comes from the environment the bench
gives the supervisor and itself: BENCH_CONCURRENCY (default 4), BENCH_RATE (default
"1000/second")."""
import os
import time

from bench.common import stamp
from handlers import handler


@handler("bench.capped", concurrency=int(os.environ.get("BENCH_CONCURRENCY", "4")))
def capped(payload, ctx):
    stamp(payload.get("n", 0), time.time())


@handler("bench.rated", rate=os.environ.get("BENCH_RATE", "1000/second"))
def rated(payload, ctx):
    stamp(payload.get("n", 0), time.time())
