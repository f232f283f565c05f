"""`python -m bench.drain [--jobs 20000 --workers 4 --db postgres|sqlite] [--profile]`

Drain: N no-op jobs are enqueued through the core first (jobs.enqueue, transactions of
1,000) and the database ANALYZEd; then a real `python -m supervisor --concurrency W`
starts, and the drain is timed from the first handler start (process start-up excluded)
until the database holds no unfinished job. Afterwards: every job and attempt counted,
`flask audit` run, CPU seconds by process group, PostgreSQL counters per job.
--profile: py-spy samples one worker (wall clock, idle included) during the drain.
"""
import argparse
import os
import time

from bench import common, profiling

# Jobs not finished, each part read from a partial index that holds live jobs only (the
# predicates spelled out as the indexes have them): one count over every status read the
# whole history, ten million rows at every poll, and the drain's time ends at that poll.
PENDING_SQL = ("SELECT (SELECT count(*) FROM jobs WHERE status = 'running') + "
               "(SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'running') "
               "AND status NOT IN ('dead', 'cancelled'))")


def pending_counter(db):
    """A cheap "jobs still unfinished" probe over one kept connection."""
    if db.is_postgres:
        conn = common.pg_connect(db.url)
        cur = conn.cursor()

        def pending():
            cur.execute(PENDING_SQL)
            return cur.fetchone()[0]
        pending.close = conn.close
        return pending
    import sqlite3
    conn = sqlite3.connect(db.name, timeout=30)

    def pending():
        return conn.execute(PENDING_SQL).fetchone()[0]
    pending.close = conn.close
    return pending


def verify(db, after_id, jobs):
    """How the drained jobs ended, from the stored history."""
    job_row = db.query("SELECT SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), count(*) "
                       "FROM jobs WHERE id > %s" if db.is_postgres else
                       "SELECT SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), count(*) "
                       "FROM jobs WHERE id > ?", (after_id,))[0]
    attempt_row = db.query(
        ("SELECT count(*), count(DISTINCT job_id), "
         "SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), max(number), "
         "SUM(CASE WHEN status = 'released' THEN 1 ELSE 0 END) "
         "FROM attempts WHERE job_id > %s") if db.is_postgres else
        ("SELECT count(*), count(DISTINCT job_id), "
         "SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), max(number), "
         "SUM(CASE WHEN status = 'released' THEN 1 ELSE 0 END) "
         "FROM attempts WHERE job_id > ?"), (after_id,))[0]
    return {"jobs_succeeded": int(job_row[0] or 0), "jobs_total": int(job_row[1]),
            "attempts": int(attempt_row[0]), "jobs_with_attempts": int(attempt_row[1]),
            "attempts_succeeded": int(attempt_row[2] or 0),
            "max_attempt_number": attempt_row[3], "attempts_released": int(attempt_row[4] or 0),
            # every job succeeded once; an attempt given back unstarted (released) is no run
            "history_complete": int(job_row[0] or 0) == jobs == int(attempt_row[2] or 0)
            == int(attempt_row[0]) - int(attempt_row[4] or 0)}


def audit(env):
    """`flask audit`: the stored history checked against SPEC §4."""
    t0 = time.monotonic()
    result = common.flask_cli(env, "audit", timeout=900)
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return {"audit_exit": result.returncode, "audit_s": round(time.monotonic() - t0, 1),
            "audit_says": lines[-1][:200] if lines else ""}


# --type: the job drained. capped and rated are the no-op under a limit (SPEC §11), set by
# --concurrency and --rate (bench/handlers/bench_limited.py).
TYPES = {"noop": common.NOOP, "capped": "bench.capped", "rated": "bench.rated"}


def run(kind="postgres", jobs=20000, workers=4, profile=False, run_audit=True, db=None,
        label="drain", quiet=False, before_workers=None, type="noop", limits=None):
    """Measure one drain; with db given (bench.scale), use that database as it is.
    before_workers(db): called with the queue filled, before the supervisor starts.
    limits: the environment of the limited types (BENCH_CONCURRENCY, BENCH_RATE)."""
    limits = limits or {}
    os.environ.update(limits)  # this process enqueues the type too
    own_db = db is None
    db = db or common.Database(kind, label)
    stamps = common.Stamps()
    result = {"system": "conveyor", "db": db.kind, "workers": workers, "type": type,
              **{name.lower(): value for name, value in limits.items()}}
    supervisor = spy = pending = None
    try:
        common.core(db.url)
        after_id = db.query("SELECT COALESCE(max(id), 0) FROM jobs")[0][0]
        prefill_s = common.enqueue_core(jobs, first=1, type=TYPES[type])
        result["prefill_core_jobs_per_s"] = round(jobs / prefill_s, 1)
        db.analyze()
        if before_workers is not None:
            result["before_workers"] = before_workers(db)
        env = common.conveyor_env(db.url, stamps, **limits)
        pending = pending_counter(db)
        stats_before = common.pg_stats(db.url) if db.is_postgres else None
        holder = {}
        groups = {
            "workers": lambda: holder["sup"].worker_pids() if "sup" in holder else [],
            "supervisor": lambda: [holder["sup"].pid] if "sup" in holder else [],
            "bench": lambda: [os.getpid()],
        }
        if db.is_postgres:
            groups["postgres_backends"] = lambda: common.postgres_backends(db.url)
        meter = common.CpuMeter(groups)
        meter.start()

        def start_workers():
            nonlocal supervisor, spy
            supervisor = holder["sup"] = common.Supervisor(env, workers)
            pids = supervisor.wait_for_workers()
            if profile:
                spy = profiling.PySpy(pids[0], "worker")

        progress = None if quiet else (lambda seen: common.say(f"  ... {seen:,} of {jobs:,} done"))
        drained = common.measure_drain(
            jobs, stamps, start_workers, pending, progress=progress,
            alive=lambda: supervisor is not None and supervisor.alive())
        if "error" in drained and supervisor is not None:
            drained["error"] += f"; supervisor log: {supervisor.log_tail(600)}"
        result.update(drained)
        meter.sample()
        cpu = meter.stop()
        if spy is not None:
            result["profile"] = spy.stop_and_summarize()
        supervisor.stop(grace_s=30)
        supervisor = None
        if "error" in drained:
            return result
        window = drained.pop("window")
        result["cpu"] = cpu
        result["cpu_ms_per_job"] = {k[:-6]: round(v * 1000 / jobs, 3) for k, v in cpu.items()
                                    if k.endswith("_cpu_s")}
        if stats_before is not None:
            time.sleep(0.6)  # let the server publish the exited backends' counters
            result["pg_per_job"] = common.per_job(stats_before, common.pg_stats(db.url), jobs)
        result.update(verify(db, after_id, jobs))
        if run_audit:
            result.update(audit(env))
        result["window_s"] = round(window[1] - window[0], 3)
        return result
    finally:
        if pending is not None:
            pending.close()
        if spy is not None:
            spy.kill()
        if supervisor is not None:
            supervisor.stop(grace_s=5)
        stamps.remove()
        common.reset_core_connection()
        if own_db:
            db.drop()


def report(result):
    lines = []
    if "error" in result:
        return f"drain ({result['db']}, {result['workers']} workers): ERROR {result['error']}"
    limited = {"capped": f", concurrency {result.get('bench_concurrency', 4)}",
               "rated": f", rate {result.get('bench_rate', '1000/second')}"}.get(result.get("type"), "")
    lines.append(f"drain ({result['db']}, {result['workers']} workers{limited}): "
                 f"{result['jobs']:,} jobs in "
                 f"{result['drain_s']:.2f}s = {result['jobs_per_s']:,.0f} jobs/s "
                 f"(first start {result['startup_s']:.2f}s after launch; store confirmed "
                 f"{result['store_lag_ms']:.0f} ms after the last handler; per worker "
                 f"{result['per_process']})")
    lines.append(f"  history: {result['jobs_succeeded']:,}/{result['jobs_total']:,} jobs succeeded, "
                 f"{result['attempts']:,} attempts ({result['attempts_succeeded']:,} succeeded, "
                 f"max number {result['max_attempt_number']}), duplicate handler runs "
                 f"{result['duplicate_runs']}, complete: {result['history_complete']}")
    if "audit_exit" in result:
        lines.append(f"  flask audit: exit {result['audit_exit']} in {result['audit_s']}s: "
                     f"{result['audit_says']}")
    cpu = result["cpu"]
    lines.append("  CPU during the drain (ms per job): " + ", ".join(
        f"{k} {v:.3f}" for k, v in result["cpu_ms_per_job"].items())
        + f"; machine busy {cpu['machine_busy_cores']:.2f} of {os.cpu_count()} cores")
    if "pg_per_job" in result:
        pj = result["pg_per_job"]
        lines.append(
            f"  PostgreSQL per job: {pj['xact_commit']:.2f} commits, {pj['tup_inserted']:.2f} rows "
            f"inserted, {pj['tup_updated']:.2f} updated ({pj.get('jobs_hot_upd', 0):.2f} of "
            f"{pj.get('jobs_upd', 0):.2f} jobs updates HOT), {pj['wal_bytes']:,.0f} WAL bytes, "
            f"{pj['wal_records']:.1f} WAL records, {pj['wal_sync']:.2f} WAL syncs "
            f"(WAL is cluster-wide)")
    lines.append(f"  prefill through the core: {result['prefill_core_jobs_per_s']:,.0f} jobs/s")
    if "profile" in result:
        lines.append(profiling.describe(result["profile"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--profile", action="store_true", help="py-spy one worker")
    parser.add_argument("--no-audit", action="store_true", help="skip `flask audit`")
    parser.add_argument("--type", choices=sorted(TYPES), default="noop",
                        help="capped: concurrency-limited, rated: rate-limited")
    parser.add_argument("--concurrency", type=int, help="bench.capped's limit (default 4)")
    parser.add_argument("--rate", help='bench.rated\'s limit (default "1000/second")')
    parser.add_argument("--json-out", help="also write the figures as JSON here")
    args = parser.parse_args()
    limits = {}
    if args.type == "capped":
        limits["BENCH_CONCURRENCY"] = str(args.concurrency or 4)
    if args.type == "rated":
        limits["BENCH_RATE"] = args.rate or "1000/second"
    result = run(args.db, args.jobs, args.workers, profile=args.profile,
                 run_audit=not args.no_audit, type=args.type, limits=limits)
    common.say(report(result))
    common.write_result(result, args.json_out)


if __name__ == "__main__":
    main()
