"""`python -m bench.all [--runs 2] [--jobs 20000] [--samples 500] [--no-peers]
[--history 0,100000,1000000] [--memory-jobs 1000000] [--memory-minutes 15] [--no-profile]`

Every measurement of issue 6, each as its own command (so each starts clean), Conveyor
and the peers interleaved within each run so they share the machine's conditions; the
figures are the median of --runs runs (scale, memory and the profile run once). Ends
with one table: Conveyor, each peer, Conveyor/peer ratios, and each target met or not.
All figures are also written to --out (JSON).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import common

PEERS = ("pgqueuer", "procrastinate", "celery", "rq")
CAPPED_PEER_JOBS = 2000  # pgqueuer under concurrency_limit=4 takes some 40 s for these


def step(module, *args, timeout=3600, env=None):
    """Run `python -m bench.<module> args --json-out F` (with `env` added to the
    environment); its figures (or an error)."""
    out = tempfile.mktemp(prefix=f"conveyor-bench-{module}-", suffix=".json")
    command = [sys.executable, "-m", f"bench.{module}", *map(str, args), "--json-out", out]
    given = "".join(f"{name}={value} " for name, value in (env or {}).items())
    common.say(f"$ {given}{' '.join(command[1:-2])}")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=common.ROOT, timeout=timeout,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"exit {proc.returncode}"}
        with open(out) as f:
            result = json.load(f)
        if isinstance(result, dict):
            result["step_s"] = round(time.monotonic() - t0, 1)
        return result
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    finally:
        if os.path.exists(out):
            os.unlink(out)


def med(runs, *path):
    """Median over runs of the value at path (None where a run has none)."""
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(value)
    return common.median(values)


# Single POST /v1/jobs requests/s with 16 clients where issue 17 started (bench/RESULTS.md,
# "Where issue 17 starts"): its target is twice that.
SINGLE_POST_AT_START = 1144


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def verdict(ok):
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def peer_result(peers_out, peer, what, workers):
    for item in peers_out.get("results", []):
        if item.get("system") == peer and item.get("what") == what and \
                item.get("workers") == workers and "error" not in item:
            return item
    return {}


def summary(runs, scale, memory, versions):
    """The one table: (measure, Conveyor, each peer with its ratio, target, verdict)."""
    rows = []
    peers = {p: [peer_result(r.get("peers", {}), p, "drain", 4) for r in runs] for p in PEERS}
    lat4 = {p: [peer_result(r.get("peers", {}), p, "latency", 4) for r in runs] for p in PEERS}
    lat8 = {p: [peer_result(r.get("peers", {}), p, "latency", 8) for r in runs] for p in PEERS}

    def with_ratio(mine, theirs):
        """The peer's figure and, in parentheses, Conveyor/peer."""
        if theirs is None:
            return "-"
        return f"{common.fmt(theirs)} ({common.fmt(ratio(mine, theirs))})"

    drain = med(runs, "drain", "jobs_per_s")
    pgq_drain = med(peers["pgqueuer"], "jobs_per_s")
    rows.append(["drain jobs/s (PostgreSQL, 4 workers)", drain,
                 *[with_ratio(drain, med(peers[p], "jobs_per_s")) for p in PEERS],
                 "≥ 1.5 x pgqueuer",
                 verdict(None if not drain or not pgq_drain else drain >= 1.5 * pgq_drain)])
    # Ratios within each run (same machine conditions), which drift less than the figures.
    rows.append(["drain Conveyor/peer within each run", "-",
                 *[" ".join(common.fmt(ratio(run.get("drain", {}).get("jobs_per_s"),
                                             p_run.get("jobs_per_s")))
                            for run, p_run in zip(runs, peers[p])) for p in PEERS], "-", "-"])
    # CPU per job drifts far less than jobs/s on a shared machine: what the drain costs.
    def cpu_per_job(result):
        cpu = (result or {}).get("cpu_ms_per_job") or {}
        parts = [v for k, v in cpu.items() if k in ("workers", "supervisor", "postgres_backends",
                                                    "store")]
        return round(sum(parts), 3) if parts else None
    mine = common.median([cpu_per_job(run.get("drain")) for run in runs])
    rows.append(["drain CPU ms per job: workers + supervisor + database or Redis "
                 "(lower is better)", mine,
                 *[with_ratio(mine, common.median([cpu_per_job(r) for r in peers[p]]))
                   for p in PEERS], "-", "-"])
    capped = med(runs, "drain_capped", "jobs_per_s")
    pgq_capped = med([peer_result(r.get("peers_capped", {}), "pgqueuer", "drain", 4) for r in runs],
                     "jobs_per_s")
    share = ratio(capped, drain)
    rows.append(["drain jobs/s, concurrency limit 4 (Conveyor: @handler(concurrency=4); "
                 "pgqueuer: concurrency_limit=4)", capped, with_ratio(capped, pgq_capped),
                 "-", "-", "-", f"≥ 0.85 x no limit ({common.fmt(share)}) and ≥ pgqueuer",
                 verdict(None if share is None or pgq_capped is None
                         else share >= 0.85 and capped >= pgq_capped)])
    batch = med(runs, "enqueue_batch", "jobs_per_s")
    pgq_batch = med(peers["pgqueuer"], "enqueue_jobs_per_s")
    rows.append(["bulk enqueue jobs/s (Conveyor: POST /v1/jobs/batch x1000, 1 client)", batch,
                 *[with_ratio(batch, med(peers[p], "enqueue_jobs_per_s")) for p in PEERS],
                 "≥ pgqueuer (ratio ≥ 1.0)",
                 verdict(None if not batch or not pgq_batch else batch >= pgq_batch)])
    single = med(runs, "enqueue_single", "requests_per_s")
    rows.append(["single POST /v1/jobs requests/s (16 clients)", single, "-", "-", "-", "-",
                 f"≥ 2 x {SINGLE_POST_AT_START:,}",
                 verdict(None if single is None else single >= 2 * SINGLE_POST_AT_START)])
    rows.append(["enqueue through the core, no HTTP (jobs/s, diagnostic)",
                 med(runs, "enqueue_core", "jobs_per_s"), "-", "-", "-", "-", "-", "-"])
    for label, key, peer_runs in (("4 workers", "latency4", lat4), ("8 workers", "latency8", lat8)):
        p50, p95, p99 = (med(runs, key, f"p{q}_ms") for q in (50, 95, 99))
        for q, mine in (("p50", p50), ("p95", p95), ("p99", p99)):
            celery = med(peer_runs["celery"], f"{q}_ms")
            rows.append([f"submit-to-start {q} ms, {label} (lower is better)",
                         mine, *[with_ratio(mine, med(peer_runs[p], f"{q}_ms")) for p in PEERS],
                         "≤ celery",
                         verdict(None if celery is None or mine is None else mine <= celery)])
    http = [med(runs, "latency_http", f"p{q}_ms") for q in (50, 95, 99)]
    rows.append(["submit-to-start p50/p95/p99 ms via POST /v1/jobs, 4 workers",
                 "/".join(common.fmt(v) for v in http), "-", "-", "-", "-",
                 "p50 ≤ 3, p99 ≤ 10",
                 verdict(None if None in (http[0], http[2]) else http[0] <= 3 and http[2] <= 10)])
    sqlite = med(runs, "drain_sqlite", "jobs_per_s")
    rows.append(["drain jobs/s, SQLite default (4 workers)", sqlite, "-", "-", "-", "-",
                 "≥ 1,000", verdict(None if sqlite is None else sqlite >= 1000)])
    if scale and isinstance(scale, list) and len(scale) > 1:
        base, last = scale[0], scale[-1]
        d = ratio(last["drain"].get("jobs_per_s"), base["drain"].get("jobs_per_s"))
        p50 = ratio(last["latency"].get("p50_ms"), base["latency"].get("p50_ms"))
        p99 = ratio(last["latency"].get("p99_ms"), base["latency"].get("p99_ms"))
        rows.append([f"scale: drain at {last['history']:,} history rows / at {base['history']:,}",
                     d, "-", "-", "-", "-", "≥ 0.90", verdict(None if d is None else d >= 0.9)])
        rows.append([f"scale: latency p50 / p99 at {last['history']:,} / at {base['history']:,}",
                     f"{common.fmt(p50)} / {common.fmt(p99)}", "-", "-", "-", "-", "≤ 1.10",
                     verdict(None if p50 is None or p99 is None else p50 <= 1.1 and p99 <= 1.1)])
        uses = all(str((r.get(k) or {}).get("claim_uses", "")).startswith("index")
                   for r in scale[1:] for k in ("explain_idle", "explain_backlog"))
        rows.append([f"scale: claim uses an index ({scale[1]['history']:,}+ history, idle and backlog)",
                     "yes" if uses else "no", "-", "-", "-", "-", "index", verdict(uses)])
    if memory and "total_growth_kb" in memory:
        rows.append([f"memory: RSS growth after warm-up, supervisor + workers "
                     f"({memory['jobs_done']:,} jobs)", f"{memory['total_growth_kb']:+,} KB",
                     "-", "-", "-", "-", "flat", "-"])
    headers = ["measure", "Conveyor"] + [f"{p} {versions.get(p, '')} (Conveyor/peer)".replace("  ", " ")
                                         for p in PEERS] + ["target", "verdict"]
    return headers, rows


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0, help="single-POST seconds")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--history", default="0,100000,1000000", help="'' to skip scale")
    parser.add_argument("--memory-jobs", type=int, default=1_000_000, help="0 to skip")
    parser.add_argument("--memory-minutes", type=float, default=15.0)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(),
                                                      "conveyor-bench-all.json"))
    parser.add_argument("--summarize", metavar="JSON", help="only print the table of a saved run")
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            saved = json.load(f)
        headers, rows = summary(saved["runs"], saved["scale"], saved["memory"], saved["versions"])
        common.say(common.table(headers, rows))
        return
    started = time.monotonic()
    info = common.machine()
    common.say("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    runs = []
    versions = {}
    for number in range(1, args.runs + 1):
        common.say(f"\n=== run {number} of {args.runs} ===")
        run = {}
        run["drain"] = step("drain", "--jobs", args.jobs, "--workers", 4, "--db", "postgres")
        if not args.no_peers:
            run["peers"] = step("peers", "--what", "drain,latency", "--jobs", args.jobs,
                                "--workers", 4, "--samples", args.samples)
            latency8 = step("peers", "--what", "latency", "--workers", 8,
                            "--samples", args.samples)
            run["peers"].setdefault("results", []).extend(latency8.get("results", []))
            versions = run["peers"].get("versions", versions)
        # A concurrency limit equal to the worker count (SPEC §11), beside pgqueuer's
        # concurrency_limit; pgqueuer drains some 50 jobs/s under it, so it gets fewer.
        run["drain_capped"] = step("drain", "--jobs", args.jobs, "--workers", 4,
                                   "--type", "capped", "--concurrency", 4)
        if not args.no_peers:
            run["peers_capped"] = step("peers", "--peer", "pgqueuer", "--what", "drain",
                                       "--jobs", min(args.jobs, CAPPED_PEER_JOBS), "--workers", 4,
                                       env={"BENCH_CONCURRENCY_LIMIT": "4"})
        run["drain_sqlite"] = step("drain", "--jobs", args.jobs, "--workers", 4, "--db", "sqlite")
        run["enqueue_batch"] = step("enqueue", "--mode", "batch", "--jobs", args.jobs)
        run["enqueue_single"] = step("enqueue", "--mode", "single", "--clients", 16,
                                     "--seconds", args.seconds)
        run["enqueue_core"] = step("enqueue", "--mode", "core", "--jobs", args.jobs)
        run["latency4"] = step("latency", "--workers", 4, "--samples", args.samples)
        run["latency8"] = step("latency", "--workers", 8, "--samples", args.samples)
        run["latency_http"] = step("latency", "--workers", 4, "--samples", args.samples,
                                   "--via", "http")
        runs.append(run)
    scale = step("scale", "--history", args.history, "--jobs", args.jobs,
                 "--samples", args.samples) if args.history else None
    memory = step("memory", "--jobs", args.memory_jobs, "--max-minutes",
                  args.memory_minutes) if args.memory_jobs else None
    profile = None if args.no_profile else step("drain", "--jobs", args.jobs, "--workers", 4,
                                                "--profile", "--no-audit")
    headers, rows = summary(runs, scale, memory, versions)
    took = time.monotonic() - started
    common.say(f"\n=== summary: median of {args.runs} run(s), {args.jobs:,} no-op jobs, "
               f"{args.samples} latency samples; took {took / 60:.0f} min ===")
    common.say(common.table(headers, rows))
    with open(args.out, "w") as f:
        json.dump({"machine": info, "versions": versions, "runs": runs, "scale": scale,
                   "memory": memory, "profile": profile, "summary": [headers, rows],
                   "took_s": round(took)}, f, indent=1, default=str)
    common.say(f"figures: {args.out}")


if __name__ == "__main__":
    main()
