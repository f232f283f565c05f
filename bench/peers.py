"""`python -m bench.peers [--install] [--peer pgqueuer|procrastinate|celery|rq|all]
[--what drain,latency] [--jobs 20000] [--workers 4] [--samples 500]`

The peers of issue 6, measured on this machine with the same loops, stamps and
definitions as Conveyor (bench/common.py), each from its own venv (bench/.peers,
gitignored) so nothing of theirs reaches Conveyor's:
- pgqueuer (asyncpg; 4 worker processes, batches of 10), procrastinate (4 `procrastinate
  worker` processes) on their own PostgreSQL database each;
- Celery (`celery worker -P prefork -c 4`, results ignored) and RQ (4 `rq worker -w
  rq.worker.SimpleWorker`) on Redis database 15 (BENCH_REDIS_URL), which the bench owns:
  it refuses a database holding other keys, and empties it after each run.
drain also times the peer's bulk enqueue (its batch API, 1,000 per call; Celery has none:
apply_async in a loop over one producer) while it fills the queue.
--install creates bench/.peers with the versions the issue names (PEER_PACKAGES).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench import common

PEER_PACKAGES = ["pgqueuer[asyncpg]==1.6.0", "procrastinate==3.10.0", "celery[redis]==5.7.0",
                 "rq==3.0.0", "psycopg2-binary", "psutil"]
PEERS = ("pgqueuer", "procrastinate", "celery", "rq")
ON_REDIS = ("celery", "rq")
BENCH_KEY_PREFIXES = (b"rq:", b"_kombu", b"unacked", b"bench-", b"celery")


def peers_python():
    return os.path.join(common.PEERS_VENV, "bin", "python")


def install():
    if not os.path.exists(peers_python()):
        common.say(f"creating {common.PEERS_VENV}")
        subprocess.run([sys.executable, "-m", "venv", common.PEERS_VENV], check=True)
    subprocess.run([peers_python(), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    common.say("installed: " + ", ".join(f"{k} {v}" for k, v in versions().items()))


def versions():
    out = subprocess.run([peers_python(), "-c", "import json, importlib.metadata as m; print(json.dumps("
                          "{p: m.version(p) for p in ('pgqueuer', 'procrastinate', 'celery', 'kombu',"
                          " 'rq', 'redis', 'asyncpg', 'psycopg')}))"],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _redis():
    from redis import Redis
    return Redis.from_url(common.REDIS_URL)


def _claim_redis():
    """The bench's Redis database must hold nothing but earlier bench runs' keys."""
    client = _redis()
    foreign = [k for k in client.scan_iter(count=1000) if not k.startswith(BENCH_KEY_PREFIXES)]
    if foreign:
        raise RuntimeError(f"{common.REDIS_URL} holds keys the bench did not make "
                           f"({foreign[:3]}...): set BENCH_REDIS_URL to an empty database")
    client.flushdb()


def run_one(peer, what, jobs=20000, workers=4, samples=500, interval_ms=20.0):
    """One peer program run; its figures, or {"error": ...}."""
    if not os.path.exists(peers_python()):
        return {"system": peer, "error": "peers not installed: python -m bench.peers --install"}
    db = None
    claimed = False
    out = tempfile.mktemp(prefix=f"conveyor-bench-{peer}-", suffix=".json")
    args = [peers_python(), "-m", f"bench.peerprogs.{peer}_peer", what, "--jobs", str(jobs),
            "--workers", str(workers), "--samples", str(samples), "--interval-ms",
            str(interval_ms), "--json-out", out]
    try:
        if peer in ON_REDIS:
            _claim_redis()
            claimed = True
            args += ["--redis", common.REDIS_URL]
        else:
            db = common.Database("postgres", f"peer_{peer}")
            args += ["--dsn", db.url]
        proc = subprocess.run(args, cwd=common.ROOT, capture_output=True, text=True,
                              timeout=max(600, jobs / 20))
        if proc.returncode != 0 or not os.path.exists(out):
            return {"system": peer, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
        with open(out) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"system": peer, "error": "timed out"}
    finally:
        if os.path.exists(out):
            os.unlink(out)
        if db is not None:
            db.drop()
        if claimed:
            try:
                _redis().flushdb()
            except Exception:  # noqa: BLE001 - figures only
                pass


def report(r, what):
    name = f"{r['system']} {r.get('version', '')}".strip()
    if "error" in r:
        return f"{name} {what}: ERROR {r['error']}"
    if what == "drain":
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in r.get("cpu_ms_per_job", {}).items())
        return (f"{name} drain ({r['workers']} workers): {r['jobs']:,} jobs in {r['drain_s']:.2f}s = "
                f"{r['jobs_per_s']:,.0f} jobs/s; bulk enqueue {r['enqueue_jobs_per_s']:,.0f} jobs/s; "
                f"CPU ms per job: {cpu}; machine busy {r['cpu']['machine_busy_cores']:.2f} cores; "
                f"per worker {r['per_process']}")
    return (f"{name} latency ({r['workers']} idle workers, {r['started']}/{r['samples']} started): "
            f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms")


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--peer", default="all", choices=PEERS + ("all",))
    parser.add_argument("--what", default="drain,latency")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.install:
        install()
        if args.peer == "all" and args.what == "drain,latency" and "--peer" not in sys.argv:
            return
    results = []
    for peer in PEERS if args.peer == "all" else (args.peer,):
        for what in args.what.split(","):
            r = run_one(peer, what, args.jobs, args.workers, args.samples, args.interval_ms)
            r["what"] = what
            common.say(report(r, what))
            results.append(r)
    common.write_result({"versions": versions(), "results": results}, args.json_out)


if __name__ == "__main__":
    main()
