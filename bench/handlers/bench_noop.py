"""`bench.noop`: the benchmarks' no-op job (loaded through HANDLER_PATHS=bench/handlers).

It does nothing but record that it ran: one fixed-size line (payload "n", time at entry,
time at return) appended to a file of its process (bench.common.stamp), exactly as the
peers' no-op tasks in bench/peerprogs/ do. No schema, so submission checks stay minimal.
"""
import time

from bench.common import stamp
from handlers import handler


@handler("bench.noop")
def noop(payload, ctx):
    stamp(payload.get("n", 0), time.time())
