"""The peers' side of bench.peers: one program per peer, run with bench/.peers' python.

`python -m bench.peerprogs.<peer> drain|latency [options] --json-out FILE` measures that
peer exactly as bench.drain / bench.latency measure Conveyor (the loops and stamps of
bench.common) and writes its figures as JSON. A peer module defines `Peer`, with:
setup(), bulk_enqueue(count, first) -> seconds, submit(n), worker_commands(count) ->
[argv], pending() -> unfinished jobs, analyze(), teardown(), and `version`.
"""
import argparse
import json
import os
import sys
import time

from bench import common


def worker_pids(processes):
    import psutil
    pids = []
    for process in processes:
        try:
            proc = psutil.Process(process.pid)
            pids.append(proc.pid)
            pids.extend(child.pid for child in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return pids


def store_pids(args):
    """The processes of the peer's store: its PostgreSQL backends, or redis-server."""
    if args.dsn:
        return common.postgres_backends(args.dsn)
    import psutil
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]


def start_workers(peer, args, stamps, processes):
    env = {**os.environ, **peer.env(args), "BENCH_STAMP_DIR": stamps.folder,
           "PYTHONUNBUFFERED": "1"}
    for i, argv in enumerate(peer.worker_commands(args.workers)):
        processes.append(common.Process(argv, env, f"{peer.name}-worker{i}"))


def drain(peer, args):
    stamps = common.Stamps()
    processes = []
    result = {"system": peer.name, "version": peer.version, "workers": args.workers}
    try:
        peer.setup()
        seconds = peer.bulk_enqueue(args.jobs, first=1)  # connected in setup(), not timed
        result["enqueue_jobs"] = args.jobs
        result["enqueue_jobs_per_s"] = round(args.jobs / seconds, 1)
        total = args.jobs
        peer.analyze()
        meter = common.CpuMeter({"workers": lambda: worker_pids(processes),
                                 "store": lambda: store_pids(args)})
        meter.start()
        drained = common.measure_drain(total, stamps, lambda: start_workers(
            peer, args, stamps, processes), peer.pending,
            alive=lambda: all(p.alive() for p in processes))
        if "error" in drained and processes:
            drained["error"] += f"; worker log: {processes[0].log_tail(600)}"
        meter.sample()
        cpu = meter.stop()
        result.update(drained)
        if "error" not in drained:
            drained.pop("window", None)
            result.pop("window", None)
            result["cpu"] = cpu
            result["cpu_ms_per_job"] = {k[:-6]: round(v * 1000 / total, 3)
                                        for k, v in cpu.items() if k.endswith("_cpu_s")}
        return result
    finally:
        for process in processes:
            process.stop(grace_s=5, sig=peer.stop_signal)
        stamps.remove()
        peer.teardown()


def latency(peer, args):
    stamps = common.Stamps()
    processes = []
    result = {"system": peer.name, "version": peer.version, "workers": args.workers}
    try:
        peer.setup()
        start_workers(peer, args, stamps, processes)
        time.sleep(1.0)
        result["warmed_up"] = common.warm_up(peer.submit, stamps, 2 * args.workers, timeout_s=60)
        result.update(common.measure_latency(peer.submit, stamps, args.samples,
                                             args.interval_ms / 1000.0))
        return result
    finally:
        for process in processes:
            process.stop(grace_s=5, sig=peer.stop_signal)
        stamps.remove()
        peer.teardown()


def main(peer_class):
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("drain", "latency"))
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--dsn", help="PostgreSQL URL of the peer's own database")
    parser.add_argument("--redis", help="Redis URL (a database the bench owns)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    peer = peer_class(args)
    result = drain(peer, args) if args.what == "drain" else latency(peer, args)
    common.write_result(result, args.json_out)
    print(json.dumps(result, default=str))
    sys.stdout.flush()
